# Two entry points, each installs the pinned stack first (once per machine):
#   make demo   adapt the pretrained LiteMedSAM with LoRA to click prompts on the built-in synthetic set:
#               zero-shot Dice first, then the adapted Dice on the same test split (compare.py)
#   make test   the whole test suite (what .ci/run runs)
PYTHON ?= python3
export NO_ALBUMENTATIONS_UPDATE = 1
STAMP := .install-stamp
DEMO := demo_lite_medsam
DEMO_FLAGS := -net lite_medsam -dataset synthetic -prompt click -image_size 128 -epochs 2 -b 4 -lr 5e-4

$(STAMP): requirements.txt
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf checkpoint/$(DEMO)_* figs/$(DEMO)_* figs/compare_$(DEMO)  # the demo is rebuilt every time
	$(PYTHON) compare.py $(DEMO_FLAGS) -mods sam_lora -exp_name $(DEMO)
	$(PYTHON) val.py -weights checkpoint/$(DEMO)_sam_lora_seed0 -save_pred checkpoint/$(DEMO)_sam_lora_seed0/predictions

test: $(STAMP)
	$(PYTHON) -m pytest -q

.PHONY: install demo test
