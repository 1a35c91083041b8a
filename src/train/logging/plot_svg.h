// A plain SVG of a training run, written by longtune itself: three stacked panels sharing the
// step axis (loss with eval loss, learning rate, memory), readable in any browser.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lt {

// history: flat records as in metrics.jsonl (step, loss, eval_loss, learning_rate,
// memory_bytes). Returns the SVG document.
std::string plot_training_svg(const std::vector<nlohmann::json>& history, const std::string& title);

}  // namespace lt
