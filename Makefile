# Two entry points, each installs the pinned stack first (once per machine):
#   make demo   adapt the pretrained LiteMedSAM with LoRA to click prompts on the built-in synthetic set:
#               zero-shot Dice first, then the adapted Dice on the same test split (compare.py)
#   make test   the whole test suite (what .ci/run runs)
#   make isic2017   the README's ISIC-2017 comparison from the pretrained LiteMedSAM, box and click tables
#               (about 2 hours on 2 CPU cores); make isic2017-sweeps adds the LoRA-rank, training-size and
#               learning-rate sweeps; make isic2017-600 the tables on all 600 test images (about 5 hours more)
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

# the README's ISIC-2017 comparison: every row with the same settings (ISIC = the dataset folder)
ISIC ?= ../shared/data/isic2017
ISIC_FLAGS := -net lite_medsam -dataset isic -data_path $(ISIC) -max_train 64 -max_eval 100 -epochs 2 -b 4 -lr 5e-4 \
	-val_freq 0 -vis 0
ISIC_LR_FLAGS := $(filter-out -lr 5e-4,$(ISIC_FLAGS))
C := checkpoint/isic_click
B := checkpoint/isic_box
isic2017: $(STAMP)
	$(PYTHON) compare.py $(ISIC_FLAGS) -prompt click -mods sam_decoder,sam_adpt,sam_lora,sam_adalora,sam_dora,sam_full \
		-decoders full,lora -exp_name isic_click
	$(PYTHON) compare.py $(ISIC_FLAGS) -prompt box -mods sam_decoder,sam_adpt,sam_lora,sam_adalora,sam_dora,sam_full \
		-decoders full,lora -exp_name isic_box
	for name in isic_click isic_box; do for file in figs/compare_$$name/tradeoff.png figs/compare_$$name/table.*; do \
		cp $$file figs/readme/$${name}_$$(basename $$file); done; done

# the LoRA-rank, training-size and learning-rate sweeps (click prompts; learning rates also for boxes);
# their figures also take the table's runs (learning rate 5e-4)
isic2017-sweeps: isic2017
	$(PYTHON) compare.py $(ISIC_FLAGS) -prompt click -mods sam_lora -decoders lora -ranks 1,16 -exp_name isic_click_ranks
	$(PYTHON) compare.py $(ISIC_FLAGS) -prompt click -mods sam_lora,sam_full -decoders lora -train_sizes 16,32 \
		-exp_name isic_click_train_sizes
	$(PYTHON) compare.py -exp_name isic_click_ranks -runs '$(C)_ranks_*,$(C)_sam_lora_dec-lora_seed0'
	$(PYTHON) compare.py -exp_name isic_click_train_sizes -runs '$(C)_train_sizes_*,$(C)_sam_lora_dec-lora_seed0,$(C)_sam_full_seed0'
	$(PYTHON) compare.py $(ISIC_LR_FLAGS) -prompt click -mods sam_lora -decoders lora -lrs 2e-3,5e-3,1e-2 -exp_name isic_click_lrs
	$(PYTHON) compare.py $(ISIC_LR_FLAGS) -prompt click -mods sam_full -lrs 1e-4,2e-3 -exp_name isic_click_lrs
	$(PYTHON) compare.py $(ISIC_LR_FLAGS) -prompt click -mods sam_adpt,sam_adalora -decoders lora -lrs 5e-3 -exp_name isic_click_lrs
	$(PYTHON) compare.py $(ISIC_LR_FLAGS) -prompt click -mods sam_lora -decoders lora -lrs 5e-3 -seeds 0,1 -exp_name isic_click_lrs
	$(PYTHON) compare.py $(ISIC_LR_FLAGS) -prompt click -mods sam_full -lrs 1e-4 -seeds 0,1 -exp_name isic_click_lrs
	$(PYTHON) compare.py $(ISIC_LR_FLAGS) -prompt box -mods sam_lora -decoders lora -lrs 5e-3 -exp_name isic_box_lrs
	$(PYTHON) compare.py $(ISIC_LR_FLAGS) -prompt box -mods sam_full -lrs 1e-4 -exp_name isic_box_lrs
	$(PYTHON) compare.py -exp_name isic_click_lrs -runs '$(C)_lrs_*,$(C)_sam_lora_dec-lora_seed0,$(C)_sam_full_seed0,$(C)_sam_adpt_dec-lora_seed0,$(C)_sam_adalora_dec-lora_seed0'
	$(PYTHON) compare.py -exp_name isic_box_lrs -runs '$(B)_lrs_*,$(B)_sam_lora_dec-lora_seed0,$(B)_sam_full_seed0'
	for name in isic_click_ranks isic_click_train_sizes isic_click_lrs isic_box_lrs; do for file in figs/compare_$$name/dice_vs_*.png \
		figs/compare_$$name/table.md; do cp $$file figs/readme/$${name}_$$(basename $$file); done; done

# all 600 test images: the best-rate rows of the sweeps, and the LoRA/full rows at four times the training
# budget (256 images, 2 epochs = 128 steps); finished runs are re-evaluated once (<run>/test_600.json)
ISIC_600_FLAGS := $(subst -max_eval 100,-max_eval 600,$(ISIC_FLAGS))
ISIC_N256_FLAGS := $(subst -max_train 64 -max_eval 100,-max_train 256 -max_eval 600,$(ISIC_LR_FLAGS))
isic2017-600: isic2017-sweeps
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_lora -decoder lora -lr 5e-3 \
		-exp_name isic_click_n256_sam_lora_dec-lora_lr5e-3_seed0
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_full -lr 1e-4 -exp_name isic_click_n256_sam_full_lr1e-4_seed0
	for lr in 2e-3 1e-3 5e-4; do $(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_lora -decoder lora -lr $$lr \
		-exp_name isic_click_n256_sam_lora_dec-lora_lr$${lr}_seed0; done  # rates for the larger budget
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_full -lr 2e-4 -exp_name isic_click_n256_sam_full_lr2e-4_seed0
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_lora -decoder lora -lr 1e-3 -seed 1 \
		-exp_name isic_click_n256_sam_lora_dec-lora_lr1e-3_seed1  # a second seed for the best rates
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_full -lr 1e-4 -seed 1 -exp_name isic_click_n256_sam_full_lr1e-4_seed1
	for lr in 2e-3 5e-3; do $(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_adalora -decoder lora -lr $$lr \
		-exp_name isic_click_n256_sam_adalora_dec-lora_lr$${lr}_seed0; done
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_adalora -decoder lora -lr 2e-3 -adalora_init orthogonal \
		-exp_name isic_click_n256_sam_adalora_dec-lora_lr2e-3_orthogonal_seed0
	for seed in 0 1; do $(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_adpt -decoder lora -lr 2e-3 \
		-seed $$seed -exp_name isic_click_n256_sam_adpt_dec-lora_lr2e-3_seed$$seed; done
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_adpt -decoder lora -lr 1e-3 \
		-exp_name isic_click_n256_sam_adpt_dec-lora_lr1e-3_seed0
	for ratio in 10 20; do $(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_adalora -decoder lora -lr 1e-3 \
		-adalora_e_lr_ratio $$ratio -exp_name isic_click_n256_sam_adalora_dec-lora_lr1e-3_elr$${ratio}_seed0; done
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_adalora -decoder lora -lr 1e-3 -adalora_e_lr_ratio 20 \
		-seed 1 -exp_name isic_click_n256_sam_adalora_dec-lora_lr1e-3_elr20_seed1
	$(PYTHON) train.py $(ISIC_600_FLAGS) -prompt box -mod sam_adalora -decoder lora \
		-adalora_e_lr_ratio 20 -exp_name isic_box_elr_sam_adalora_dec-lora_lr5e-4_elr20_seed0  # the box table's settings
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt box -mod sam_lora -decoder lora -lr 5e-3 \
		-exp_name isic_box_n256_sam_lora_dec-lora_lr5e-3_seed0
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt box -mod sam_full -lr 1e-4 -exp_name isic_box_n256_sam_full_lr1e-4_seed0
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt box -mod sam_adalora -decoder lora -lr 1e-3 -adalora_e_lr_ratio 20 \
		-exp_name isic_box_n256_sam_adalora_dec-lora_lr1e-3_elr20_seed0
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt box -mod sam_adalora -decoder lora -lr 1e-3 -adalora_e_lr_ratio 20 \
		-seed 1 -exp_name isic_box_n256_sam_adalora_dec-lora_lr1e-3_elr20_seed1  # a second seed at four times the budget
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt box -mod sam_lora -decoder lora -lr 5e-3 -seed 1 \
		-exp_name isic_box_n256_sam_lora_dec-lora_lr5e-3_seed1
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt box -mod sam_full -lr 1e-4 -seed 1 -exp_name isic_box_n256_sam_full_lr1e-4_seed1
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt click -mod sam_dora -decoder lora -lr 1e-3 -merge \
		-exp_name isic_click_n256_sam_dora_dec-lora_lr1e-3_seed0  # DoRA at four times the budget, LoRA's best rates
	$(PYTHON) train.py $(ISIC_N256_FLAGS) -prompt box -mod sam_dora -decoder lora -lr 5e-3 -merge \
		-exp_name isic_box_n256_sam_dora_dec-lora_lr5e-3_seed0
	$(PYTHON) compare.py $(ISIC_FLAGS) -prompt box -mods sam_lora,sam_full -decoders lora -seeds 1 -exp_name isic_box  # a second seed
	$(PYTHON) compare.py $(ISIC_600_FLAGS) -prompt click -mods sam_decoder,sam_adpt,sam_lora,sam_adalora,sam_full \
		-decoders full,lora -seeds 1 -exp_name isic_click_seed1  # a second seed for the main tables, tested on 600
	$(PYTHON) compare.py $(ISIC_600_FLAGS) -prompt click -mods sam_dora -decoders full,lora -seeds 1 -merge \
		-exp_name isic_click_seed1
	$(PYTHON) compare.py $(ISIC_600_FLAGS) -prompt box -mods sam_decoder,sam_adpt,sam_adalora -decoders full,lora \
		-seeds 1 -exp_name isic_box_seed1
	$(PYTHON) compare.py $(ISIC_600_FLAGS) -prompt box -mods sam_lora -decoders full -seeds 1 -exp_name isic_box_seed1
	$(PYTHON) compare.py $(ISIC_600_FLAGS) -prompt box -mods sam_dora -decoders lora,full -seeds 1 -merge \
		-exp_name isic_box_seed1
	$(PYTHON) compare.py -max_eval 600 -exp_name isic_click_600 -runs '$(C)_lrs_sam_lora_dec-lora_lr5e-3_seed*,$(C)_lrs_sam_adpt_dec-lora_lr5e-3_seed0,$(C)_lrs_sam_adalora_dec-lora_lr5e-3_seed0,$(C)_lrs_sam_full_lr1e-4_seed*,$(C)_sam_lora_dec-lora_seed0,$(C)_sam_full_seed0,$(C)_n256_*'
	$(PYTHON) compare.py -max_eval 600 -exp_name isic_box_600 -runs '$(B)_lrs_sam_lora_dec-lora_lr5e-3_seed0,$(B)_lrs_sam_full_lr1e-4_seed0,$(B)_sam_lora_dec-lora_seed0,$(B)_sam_full_seed0,$(B)_n256_*,$(B)_elr_*'
	for run in $(B)_sam_dora_dec-full_seed0 $(B)_sam_dora_dec-lora_seed0 $(C)_sam_dora_dec-full_seed0 \
		$(C)_sam_dora_dec-lora_seed0; do \
		$(PYTHON) val.py -weights $$run -merge -max_eval 600 -json $$run/test_600.json; done  # DoRA merged: 6x faster
	$(PYTHON) compare.py -max_eval 600 -exp_name isic_box_main_600 -runs '$(B)_zero_shot,$(B)_sam_*_seed[01],$(B)_seed1_sam_*'
	$(PYTHON) compare.py -max_eval 600 -exp_name isic_click_main_600 -runs '$(C)_zero_shot,$(C)_sam_*_seed0,$(C)_seed1_sam_*'
	for name in isic_click_seed1 isic_box_seed1; do $(PYTHON) compare.py -exp_name $$name -runs "checkpoint/$${name}_*"; done
	for name in isic_click_600 isic_box_600 isic_box_main_600 isic_click_main_600 isic_click_seed1 isic_box_seed1; do cp figs/compare_$$name/table.md figs/readme/$${name}_table.md; \
		cp figs/compare_$$name/tradeoff.png figs/readme/$${name}_tradeoff.png; done

test: $(STAMP)
	$(PYTHON) -m pytest -q

.PHONY: install demo test isic2017 isic2017-sweeps isic2017-600
