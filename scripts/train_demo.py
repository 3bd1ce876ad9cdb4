"""Train a demo model (model=demo_llava / model=demo_internvl) on synthetic scenes.

    python scripts/train_demo.py configs/train/demo_llava.yaml [key=value ...]
    python scripts/train_demo.py configs/train/demo_internvl.yaml device=cuda optim.max_steps=3000

The yaml holds every training choice (architecture, data, optimiser, schedule, evaluation,
save dtype); `key=value` overrides any of them (OmegaConf dotlist). The run writes
`<out_dir>/train.log` (JSON lines: loss, learning rate, held-out scores) and
`<out_dir>/<model>/` (weights, tokenizer, image processor, README.md model card,
training_summary.json): copy that folder's files to src/vlmloc/assets/<model>/ to ship them.
See vlmloc.training.loop for what a run does.
"""

import sys

from vlmloc.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
