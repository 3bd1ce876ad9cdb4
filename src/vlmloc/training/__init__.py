"""Training of the project's demo models (configs/model/demo_*.yaml) on synthetic scenes.

    python scripts/train_demo.py configs/train/demo_llava.yaml

- `build`: untrained demo models of the real LLaVA / InternVL classes (configs and tokenizers
  from `vlmloc.models.tiny`, transformers' default init).
- `data`: training scenes of the synthetic generator's train split, one packed example per
  image (all its questions share the visual prefix), prompts and answers from the adapter.
- `loop`: the training run, held-out scoring, saving and the model card.
"""
