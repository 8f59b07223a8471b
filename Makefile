# Two entry points, each installs the pinned stack first (once per machine):
#   make demo   adapt MobileSAM with LoRA on the built-in synthetic set, then evaluate its checkpoint
#   make test   the whole test suite (what .ci/run runs)
PYTHON ?= python3
export NO_ALBUMENTATIONS_UPDATE = 1
STAMP := .install-stamp

$(STAMP): requirements.txt
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf checkpoint/demo_mobile_sam_lora figs/demo_mobile_sam_lora  # the demo run is rebuilt every time
	$(PYTHON) train.py -net mobile_sam -mod sam_lora -dataset synthetic -image_size 128 -epochs 4 -b 4 -lr 1e-3 -exp_name demo_mobile_sam_lora
	$(PYTHON) val.py -weights checkpoint/demo_mobile_sam_lora -json checkpoint/demo_mobile_sam_lora/test_metrics.json -save_pred checkpoint/demo_mobile_sam_lora/predictions

test: $(STAMP)
	$(PYTHON) -m pytest -q

.PHONY: install demo test
