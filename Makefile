# vlmloc make targets. MODEL, DATA and ARGS pass through to the Hydra command line.
MODEL ?= demo_llava
DATA ?= synthetic
ARGS ?=
PY ?= python
IMAGENET ?= /data/imagenet
REAL_FILES ?= ../shared/real_configs/llava-1.5-7b-hf

WHICH ?= newest

.PHONY: help install constraints ci train-demo demo baseline table1 table2 table3 fig1 fig2 fig3 fig4 fig5 pairs paper paper-smoke bench test test-slow test-all clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install:  ## install the package with test and SLURM extras (CPU torch first)
	pip install torch==2.13.0 && pip install -e ".[dev,slurm]"

train-demo:  ## retrain a demo model on a GPU: make train-demo MODEL=demo_llava ARGS="device=cuda"
	$(PY) scripts/train_demo.py configs/train/$(MODEL).yaml $(ARGS)

demo:  ## the embedded default: baseline, token_ablation and shuffle on demo_llava over held-out synthetic scenes (CPU, ~3.5 min)
	$(PY) -m vlmloc $(ARGS)

baseline:  ## baseline evaluation, e.g. make baseline MODEL=llava7b DATA=coco ARGS="data.root=/data/coco"
	$(PY) -m vlmloc experiment=baseline model=$(MODEL) data=$(DATA) $(ARGS)

table1:  ## Table 1, token ablation: make table1 MODEL=llava7b DATA=coco ARGS="data.root=/data/coco"
	$(PY) -m vlmloc experiment=token_ablation model=$(MODEL) data=$(DATA) $(ARGS)

table2:  ## Table 2, global and intra-object shuffle
	$(PY) -m vlmloc experiment=shuffle model=$(MODEL) data=$(DATA) $(ARGS)

fig1:  ## object extension (Fig. 1, 8, 9), e.g. make fig1 MODEL=llava7b DATA=coco ARGS="data.root=/data/coco"
	$(PY) -m vlmloc experiment=extension model=$(MODEL) data=$(DATA) $(ARGS)

table3: MODEL = demo_internvl
table3: DATA = synthetic_wide
table3:  ## view ablation, InternVL only (Table 3, Fig. 10), e.g. make table3 MODEL=internvl8b DATA=coco_sizes ARGS="data.root=/data/coco"
	$(PY) -m vlmloc experiment=view_ablation model=$(MODEL) data=$(DATA) $(ARGS)

fig4:  ## causal mediation per head, e.g. make fig4 MODEL=llava7b ARGS="data.pairs_dir=outputs/make_pairs-llava7b-coco data.n=50"
	$(PY) -m vlmloc experiment=cma model=$(MODEL) data=pairs $(ARGS)

fig2:  ## position probes (Fig. 2, 11): make fig2 MODEL=llava7b [IMAGENET=/data/imagenet]; tiny models use the synthetic scenes
	$(PY) -m vlmloc experiment=position_probe model=$(MODEL) $(if $(filter tiny_% demo_%,$(MODEL)),data=synthetic,data=imagenet data.root=$(IMAGENET) batch_size=16 experiment.num_workers=8) $(ARGS)

fig3:  ## attention knockout (Fig. 3, 12), e.g. make fig3 MODEL=llava7b DATA=coco ARGS="data.root=/data/coco batch_size=960" (80 GB GPU)
	$(PY) -m vlmloc experiment=knockout model=$(MODEL) data=$(DATA) $(ARGS)

fig5:  ## head ablation (Fig. 5, 15) from a cma run, e.g. make fig5 MODEL=llava7b DATA=coco ARGS="data.root=/data/coco experiment.cma_dir=outputs/cma-llava7b-pairs"
	$(PY) -m vlmloc experiment=head_ablation model=$(MODEL) data=$(DATA) $(ARGS)

pairs:  ## object-removal pairs, e.g. make pairs MODEL=llava7b DATA=coco ARGS="data.root=/data/coco inpaint=lama inpaint.checkpoint=/ckpt/big-lama.pt"
	$(PY) -m vlmloc experiment=make_pairs model=$(MODEL) data=$(DATA) $(ARGS)

paper:  ## the whole paper for one model, then report.md / report.html: make paper MODEL=llava7b DATA=coco ARGS="data.root=/data/coco experiment.probe_root=/data/imagenet"
	$(PY) -m vlmloc experiment=paper model=$(MODEL) data=$(DATA) $(ARGS)

paper-smoke:  ## experiment=paper at CI size on a CPU (demo models): make paper-smoke MODEL=demo_internvl
	$(PY) -m vlmloc experiment=paper_smoke model=$(MODEL) inpaint=oracle $(ARGS)

bench:  ## the paper-scale timing on a GPU (random weights of a real config): make bench REAL_FILES=/path/llava-1.5-7b-hf
	PYTHONPATH=src $(PY) scripts/bench_paper.py --config-dir $(REAL_FILES) --out outputs/bench $(ARGS)

constraints:  ## pin the active environment (after its tests passed) into constraints/$(WHICH).txt (newest or lowest)
	@tv=$$($(PY) -c "import transformers; print(transformers.__version__)"); { \
	  echo "# The exact environment the test suite passed in ($(WHICH) supported transformers, $$tv): Python 3.11, CPU torch."; \
	  echo "# Reproduce it: pip install torch==2.13.0 && pip install -c constraints/$(WHICH).txt -e \".[dev,slurm]\""; \
	  echo "# Regenerate it from an environment whose tests passed: make constraints WHICH=$(WHICH)"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^vlmloc' | sed 's/+cpu$$//'; } > constraints/$(WHICH).txt

ci:  ## what CI runs: the suite on the newest allowed transformers, then in a fresh venv on the lowest (constraints/lowest.txt)
	bash .ci/run

test:  ## the default test suite (fast; what CI runs)
	$(PY) -m pytest

test-slow:  ## only the slow tests
	$(PY) -m pytest -m slow

test-all:  ## every test, slow ones included
	$(PY) -m pytest -m "slow or not slow"

clean:  ## remove generated data and run outputs
	rm -rf outputs/* data/ .cache/ && touch outputs/.gitkeep
