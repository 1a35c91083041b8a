// `longtune train` as a whole job: the Trainer (trainer_loop.h) does the work.
#include "train/trainer.h"
#include "train/trainer_loop.h"

namespace lt {

void run_train(const TrainOptions& o) {
  Trainer trainer(o);
  trainer.train();
}

}  // namespace lt
