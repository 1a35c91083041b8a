// Training plot as SVG (see plot_svg.h).
#include "train/logging/plot_svg.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace lt {

namespace {

struct Series {
  std::string label, color;
  std::vector<std::pair<double, double>> points;  // (step, value)
};

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else if (c == '&')
      o += "&amp;";
    else
      o += c;
  }
  return o;
}

// Tick label: short and exact enough (1.5e-05, 2.31, 1200).
std::string tick(double v) { return fmt::format("{:.4g}", std::fabs(v) < 1e-300 ? 0.0 : v); }

// "Nice" tick positions in [lo, hi]: multiples of 1, 2 or 5 x 10^k, about four intervals.
std::vector<double> nice_ticks(double lo, double hi) {
  const double raw = (hi - lo) / 4, mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / mag < 1.5   ? mag
                      : raw / mag < 3.5 ? 2 * mag
                      : raw / mag < 7.5 ? 5 * mag
                                        : 10 * mag;
  std::vector<double> out;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
    out.push_back(v);
  return out;
}

// One panel at vertical offset y0: axes, 5 ticks each way, the series as polylines (a single
// point becomes a dot), a legend at the top right.
std::string panel(double y0, const std::string& title, const std::vector<Series>& series,
                  double x_min, double x_max) {
  constexpr double kLeft = 80, kWidth = 640, kHeight = 170;
  double lo = INFINITY, hi = -INFINITY;
  for (const auto& s : series)
    for (const auto& [x, y] : s.points)
      if (std::isfinite(y)) lo = std::min(lo, y), hi = std::max(hi, y);
  std::string o = fmt::format("<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{}</text>\n", kLeft,
                              y0 - 8, escape(title));
  o += fmt::format(
      "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" "
      "stroke=\"#888\"/>\n",
      kLeft, y0, kWidth, kHeight);
  if (!std::isfinite(lo)) {
    o += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#888\">no data</text>\n", kLeft + 10,
                     y0 + kHeight / 2);
    return o;
  }
  if (hi - lo < 1e-12 * std::max(1.0, std::fabs(hi)))
    lo -= 0.5 * std::max(1e-12, std::fabs(lo)), hi += 0.5 * std::max(1e-12, std::fabs(hi));
  const double xr = std::max(1e-9, x_max - x_min);
  auto px = [&](double x) { return kLeft + (x - x_min) / xr * kWidth; };
  auto py = [&](double y) { return y0 + kHeight - (y - lo) / (hi - lo) * kHeight; };
  for (const double v : nice_ticks(lo, hi)) {
    const double y = py(v);
    o += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#eee\"/>\n",
                     kLeft, y, kLeft + kWidth, y);
    o += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\" font-size=\"11\">{}</text>\n",
                     kLeft - 4, y + 4, tick(v));
  }
  for (double xv : nice_ticks(x_min, x_max)) {
    if (xr >= 4) xv = std::round(xv);  // steps are whole numbers
    o += fmt::format(
        "<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}"
        "</text>\n",
        px(xv), y0 + kHeight + 14, tick(xv));
  }
  int legend = 0;
  for (const auto& s : series) {
    if (s.points.empty()) continue;
    if (s.points.size() == 1) {
      o += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n",
                       px(s.points[0].first), py(s.points[0].second), s.color);
    } else {
      o += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"",
                       s.color);
      for (const auto& [x, y] : s.points)
        if (std::isfinite(y)) o += fmt::format("{:.1f},{:.1f} ", px(x), py(y));
      o += "\"/>\n";
    }
    // Legends sit on the title row, right-aligned, so they never cover the curves.
    o += fmt::format(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"12\" fill=\"{}\">{}"
        "</text>\n",
        kLeft + kWidth - 150 * legend++, y0 - 8, s.color, escape(s.label));
  }
  return o;
}

}  // namespace

std::string plot_training_svg(const std::vector<nlohmann::json>& history,
                              const std::string& title) {
  Series loss{"train loss", "#1f77b4", {}}, eval{"eval loss", "#d62728", {}},
      lr{"learning rate", "#2ca02c", {}}, mem{"peak memory (MiB)", "#9467bd", {}};
  double x_min = INFINITY, x_max = -INFINITY;
  for (const auto& r : history) {
    if (!r.contains("step")) continue;
    const double x = r["step"].get<double>();
    auto take = [&](const char* key, Series& s, double scale) {
      if (r.contains(key) && r[key].is_number()) {
        s.points.push_back({x, r[key].get<double>() * scale});
        x_min = std::min(x_min, x), x_max = std::max(x_max, x);
      }
    };
    take("loss", loss, 1);
    take("eval_loss", eval, 1);
    take("learning_rate", lr, 1);
    take("memory_bytes", mem, 1.0 / (1 << 20));
  }
  if (!std::isfinite(x_min)) x_min = 0, x_max = 1;
  std::string o =
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"720\" "
      "font-family=\"sans-serif\" font-size=\"13\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o += fmt::format("<text x=\"380\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
                   escape(title));
  o += panel(60, "Loss", {loss, eval}, x_min, x_max);
  o += panel(280, "Learning rate", {lr}, x_min, x_max);
  o += panel(500, "Memory", {mem}, x_min, x_max);
  o += "<text x=\"400\" y=\"706\" text-anchor=\"middle\">step</text>\n</svg>\n";
  return o;
}

}  // namespace lt
