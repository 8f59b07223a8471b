"""Adaptation modes (-mod) on tiny SAM ViT and MobileSAM nets: what trains, what the adapters change,
AdaLoRA's pruning, batched decoding, activation checkpointing, merging and adapter checkpoints."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from conftest import missing
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from cfg import Config
from common.errors import UserError
from engine.checkpoints import load_weights, save_weights
from engine.trainer import keep_frozen_batchnorm_in_eval
from models import build_segmenter
from models.activation_checkpointing import enable_activation_checkpointing, enable_mlp_recompute
from models.merge import merge_adapters, official_state
from models.modes import apply_mode, get_mode, mode_names
from models.modes.adalora import adalora_schedule, orthogonal_regulariser
from models.modes.adaptation import parameter_table
from models.modes.rank_budget import RankBudget
from models.segmenter import Prompts

SIZE = 64
SAM_TINY = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
NETS = ("sam-tiny", "mobile_sam")
# every registered mode is tested (timm-style: a new mode needs no edit here)
ALL_MODES = tuple(mode_names())
PEFT_MODES = tuple(m for m in ALL_MODES if get_mode(m).adapter_prefix)  # modes that add encoder parameters
LORA_FAMILY = tuple(m for m in PEFT_MODES if get_mode(m).mergeable)  # peft tuners folded by -merge
# attention blocks: SAM-tiny depth 2; TinyViT stages 1-3 have 2 + 6 + 2 attention blocks
ATTENTION_BLOCKS = {"sam-tiny": SAM_TINY["depth"], "mobile_sam": 10}
# the trainable tensors each LoRA-family mode adds to every adapted linear (AdaLoRA's ranknum is frozen)
LORA_KINDS = {"sam_lora": {"lora_A", "lora_B"}, "sam_dora": {"lora_A", "lora_B", "lora_magnitude_vector"},
              "sam_adalora": {"lora_A", "lora_B", "lora_E"}}
LORA_PARAM = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_E|lora_magnitude_vector|ranknum)"
                        r"\.default(\.weight)?")
ADAPTER_PARAM = re.compile(r"(?P<module>.+)\.adapter\.(?P<kind>down|up)\.(weight|bias)")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- helpers
def build(net: str, num_classes: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if net == "sam-tiny":
        return build_segmenter("sam", "vit_b", SIZE, num_classes, **SAM_TINY)
    return build_segmenter("mobile_sam", "tiny_vit", SIZE, num_classes)


def adapted(net: str, mode: str, total_steps: int = 10, num_classes: int = 1, **config):
    """The seed-0 base of `net`, adapted in place by `mode` (built exactly as build(net) builds it)."""
    model = build(net, num_classes)
    values = Config(mod=mode, **config)  # the mode's options as a run would pass them (Config defaults)
    options = {name: getattr(values, name) for name in get_mode(mode).options}
    adaptation = apply_mode(model, mode, total_steps, **options)
    return model, adaptation


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 255


def clicks(batch: int = 2, classes: int = 1, seed: int = 1) -> Prompts:
    """One foreground and one background click per class and image."""
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, classes, 2, 2, generator=g) * SIZE
    labels = torch.tensor([1.0, 0.0]).expand(batch, classes, 2).clone()
    return Prompts(points=points, point_labels=labels)


def boxes(batch: int = 2, classes: int = 1, seed: int = 2) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch, classes, 2, generator=g) * SIZE / 2
    size = torch.rand(batch, classes, 2, generator=g) * SIZE / 2 + 4
    return Prompts(boxes=torch.cat([corner, corner + size], dim=-1))


def target(logits: torch.Tensor, seed: int = 3) -> torch.Tensor:
    return (torch.rand(logits.shape, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def task_loss(logits: torch.Tensor, iou: torch.Tensor | None = None) -> torch.Tensor:
    """BCE on the mask logits, plus a term on the predicted IoU when given (the engine's loss has none,
    so without it the IoU head would be trainable but never get a gradient)."""
    loss = F.binary_cross_entropy_with_logits(logits, target(logits))
    return loss if iou is None else loss + iou.square().mean()


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def encoder_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in trainable(model).items() if n.startswith("image_encoder.")}


def lora_layout(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """adapted module name -> {tensor kind: parameter} for peft's LoRA-family tensors."""
    layout: dict[str, dict[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        match = LORA_PARAM.fullmatch(name)
        if match:
            layout.setdefault(match["module"], {})[match["kind"]] = param
    return layout


def adapter_layout(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    layout: dict[str, dict[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        match = ADAPTER_PARAM.fullmatch(name)
        if match:
            layout.setdefault(match["module"], {})[name.rsplit(".", 2)[1] + "." + name.rsplit(".", 1)[1]] = param
    return layout


def expected_linears(net: str) -> dict[str, tuple[int, int]]:
    """The linears the LoRA modes must adapt -> (in, out), worked out independently of the adapt targets."""
    if net == "sam-tiny":
        dim = SAM_TINY["embed_dim"]
        shapes = {"attn.qkv": (dim, 3 * dim), "attn.proj": (dim, dim), "mlp.lin1": (dim, 4 * dim),
                  "mlp.lin2": (4 * dim, dim)}
        return {f"image_encoder.blocks.{i}.{part}": shape for i in range(SAM_TINY["depth"])
                for part, shape in shapes.items()}
    encoder = build(net).image_encoder  # every encoder Linear except the unused ImageNet classifier
    return {f"image_encoder.{n}": (m.in_features, m.out_features) for n, m in encoder.named_modules()
            if isinstance(m, nn.Linear) and n != "head"}


def perturb_(params, seed: int = 7, scale: float = 0.05) -> None:
    """Add noise, so that zero-initialised adapter halves no longer make the adapters a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=g) * scale)


def forward(model: nn.Module, prompts: Prompts | None = None, batch: int = 2) -> torch.Tensor:
    return model(images(batch), prompts or clicks(batch, model.num_classes))[0]


# ----------------------------------------------------------------------------- 1. trainable sets
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_trainable_parameters_per_mode(net: str, mode: str) -> None:
    model, adaptation = adapted(net, mode)
    assert adaptation.mode == mode
    params = dict(model.named_parameters())
    train = set(trainable(model))
    decoder = {n for n in params if n.startswith("mask_decoder.")}
    prompt = {n for n in params if n.startswith("prompt_encoder.")}
    encoder = {n for n in params if n.startswith("image_encoder.")}
    assert decoder and prompt and encoder and decoder | prompt | encoder == set(params)

    if mode == "sam_full":
        assert train == set(params)
        return
    assert decoder <= train, "the whole mask decoder trains in every mode but sam_full too"
    assert not prompt & train, "the prompt encoder stays frozen"
    if mode == "sam_decoder":
        assert train == decoder
        return

    encoder_train = train & encoder
    blocks = ATTENTION_BLOCKS[net]
    if mode == "sam_adpt":
        layout = adapter_layout(model)
        assert layout and encoder_train == {f"{module}.adapter.{part}" for module in layout for part in layout[module]}
        attention_blocks = {name.rsplit(".", 2)[0] for name in expected_linears(net)}
        assert len(attention_blocks) == blocks
        assert set(layout) == {f"{b}.{part}" for b in attention_blocks for part in ("attn", "mlp")}
        for module, tensors in layout.items():
            assert set(tensors) == {"down.weight", "down.bias", "up.weight", "up.bias"}
            dim = tensors["down.weight"].shape[1]
            assert tensors["down.weight"].shape == (dim // 4, dim)  # default bottleneck dim / 4
            assert tensors["up.weight"].shape == (dim, dim // 4)
            assert torch.count_nonzero(tensors["up.weight"]) == 0 and torch.count_nonzero(tensors["up.bias"]) == 0
        return

    layout = lora_layout(model)
    expected = expected_linears(net)
    assert len(expected) == 4 * blocks
    assert set(layout) == set(expected), "exactly the declared qkv/proj/MLP linears of every block are adapted"
    rank = {"sam_adalora": Config().adalora_init_r}.get(mode, 4)
    for module, tensors in layout.items():
        kinds = {kind for kind, p in tensors.items() if p.requires_grad}
        assert kinds == LORA_KINDS[mode], module
        if mode == "sam_adalora":
            assert not tensors["ranknum"].requires_grad
        fan_in, fan_out = expected[module]
        assert tensors["lora_A"].shape == (rank, fan_in)
        assert tensors["lora_B"].shape == (fan_out, rank)
        base = model.get_submodule(module).base_layer
        assert isinstance(base, nn.Linear) and not base.weight.requires_grad
    adapter_names = {n for n in encoder if LORA_PARAM.fullmatch(n)}
    assert encoder_train == {n for n in adapter_names if not n.endswith("ranknum.default")}


@pytest.mark.parametrize("mode", ALL_MODES)
def test_parameter_table_splits_adapters_base_and_decoder(mode: str) -> None:
    model, _ = adapted("sam-tiny", mode)
    prefix = get_mode(mode).adapter_prefix
    rows = {part: (train, total) for part, train, total in parameter_table(model, prefix)}
    params = dict(model.named_parameters())
    count = lambda names: sum(params[n].numel() for n in names)
    decoder = count(n for n in params if n.startswith("mask_decoder."))
    assert rows["mask decoder"] == (decoder, decoder)
    assert rows["all"] == (sum(p.numel() for p in params.values() if p.requires_grad),
                           sum(p.numel() for p in params.values()))
    assert rows["all"][1] == sum(total for part, _, total in parameter_table(model, prefix) if part != "all")
    base_total = rows["encoder base"][1]
    assert base_total == sum(p.numel() for p in build("sam-tiny").image_encoder.parameters())
    if mode == "sam_full":
        assert all(train == total for train, total in rows.values())
    elif mode == "sam_decoder":
        assert rows["encoder adapters"] == (0, 0) and rows["encoder base"][0] == 0 and rows["other"][0] == 0
    else:
        assert rows["encoder base"][0] == 0 and rows["other"][0] == 0
        adapters = count(n for n in params if n.startswith("image_encoder.") and params[n].requires_grad)
        assert rows["encoder adapters"][0] == adapters > 0
        if mode == "sam_adalora":  # one frozen ranknum scalar per adapted linear
            assert rows["encoder adapters"][1] - adapters == 4 * SAM_TINY["depth"]


@pytest.mark.parametrize("mode", LORA_FAMILY + ("sam_adpt",))
def test_mobile_sam_adapted_linears_match_official_list(shared_dir: Path, mode: str) -> None:
    meta_path = shared_dir / "reference" / "mobilesam_vit_t.meta.json"
    if not meta_path.is_file():
        missing(f"{meta_path} is missing")
    official = {name: (fan_in, fan_out) for name, fan_in, fan_out, _ in json.loads(meta_path.read_text())
                ["linear_modules"] if name.startswith("image_encoder.") and name != "image_encoder.head"}
    assert len(official) == 4 * ATTENTION_BLOCKS["mobile_sam"]
    model, _ = adapted("mobile_sam", mode)
    if mode == "sam_adpt":
        blocks = {name.rsplit(".", 2)[0] for name in official}
        assert set(adapter_layout(model)) == {f"{b}.{part}" for b in blocks for part in ("attn", "mlp")}
        return
    layout = lora_layout(model)
    assert set(layout) == set(official)
    for module, (fan_in, fan_out) in official.items():
        assert layout[module]["lora_A"].shape[1] == fan_in and layout[module]["lora_B"].shape[0] == fan_out


def stem_convs() -> set[str]:
    """MobileSAM's convolutional stem convs that -lora_conv adapts: the patch embedding and the stage-0
    MBConv convs, except the depthwise ones (groups > 1)."""
    encoder = build("mobile_sam").image_encoder
    return {f"image_encoder.{n}" for n, m in encoder.named_modules() if isinstance(m, nn.Conv2d)
            and m.groups == 1 and (n.startswith("patch_embed.") or re.match(r"layers\.0\.blocks\.", n))}


def test_lora_conv_also_adapts_mobile_sam_stem() -> None:
    convs = stem_convs()
    assert len(convs) == 6  # 2 patch-embedding convs + conv1/conv3 of the 2 stage-0 MBConv blocks
    model, _ = adapted("mobile_sam", "sam_lora", lora_conv=True)
    layout = lora_layout(model)
    assert set(layout) == set(expected_linears("mobile_sam")) | convs
    for name in convs:
        layer = model.get_submodule(name)
        assert isinstance(layer.base_layer, nn.Conv2d) and not layer.base_layer.weight.requires_grad
        assert layout[name]["lora_A"].requires_grad and layout[name]["lora_B"].requires_grad
    with pytest.raises(ValueError, match="no convolutions"):
        adapted("sam-tiny", "sam_lora", lora_conv=True)


# ----------------------------------------------------------------------------- 2. no-op at start
@pytest.mark.parametrize("net,mode", [(n, m) for m in PEFT_MODES for n in NETS] + [("mobile_sam", "sam_lora+conv")])
def test_adapters_start_as_identity_and_change_output_after_a_step(net: str, mode: str) -> None:
    config = dict(lora_conv=True) if mode == "sam_lora+conv" else {}
    base = build(net).eval()
    model, _ = adapted(net, mode.split("+")[0], **config)
    model.eval()
    with torch.no_grad():
        base_logits, base_iou = base(images(), clicks())
        logits, iou = model(images(), clicks())
    torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(iou, base_iou, atol=1e-5, rtol=0)

    start = (logits - base_logits).abs().max()
    # One Adam step on the encoder's adapter tensors only: the output must move.
    adapters = encoder_adapter_params(model)
    optimizer = torch.optim.Adam(adapters.values(), lr=5e-2)
    task_loss(forward(model)).backward()
    optimizer.step()
    with torch.no_grad():
        moved = (model(images(), clicks())[0] - base_logits).abs().max()
    # (AdaLoRA's update is a product of three small factors, so its first step moves the output least)
    assert moved > max(1e-5, 10 * start), f"{mode} adapters did not change the output ({moved:.2e})"
    # ... while the frozen base did not change
    base_state = base.state_dict()
    for name, value in model.state_dict().items():
        plain = name.replace(".base_layer", "")
        if plain in base_state and name not in adapters:
            assert torch.equal(value, base_state[plain]), name


# ----------------------------------------------------------------------------- 3. gradients
@pytest.mark.parametrize("net,mode", [(n, m) for m in ALL_MODES for n in NETS] + [("mobile_sam", "sam_lora+conv")])
def test_gradients_reach_only_trainable_tensors(net: str, mode: str) -> None:
    model, _ = adapted(net, mode.split("+")[0], lora_conv=mode.endswith("+conv"))
    if net == "mobile_sam":  # TinyViT's init zeroes each MBConv's last BN gamma, which blocks all gradient
        with torch.no_grad():  # into the MBConv branch; pretrained weights have non-zero gammas
            for block in model.image_encoder.layers[0].blocks:
                block.conv3.bn.weight.fill_(1.0)
    model.train()
    keep_frozen_batchnorm_in_eval(model)
    task_loss(*model(images(), clicks())).backward()
    # Parts the forward pass never uses: MobileSAM's ImageNet head, and the prompt encoder's mask
    # downscaling and box-corner embeddings (only clicks are given).
    unused = re.compile(r"image_encoder\.(norm_)?head\..*|prompt_encoder\.(mask_downscaling\..*|"
                        r"point_embeddings\.[23]\..*)")
    with_grad = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} got a gradient"
        elif unused.fullmatch(name):
            assert param.grad is None, f"{name} is unused but got a gradient"
        else:
            assert param.grad is not None, f"trainable {name} got no gradient"
            with_grad += 1
    assert with_grad == sum(1 for n, p in model.named_parameters() if p.requires_grad and not unused.fullmatch(n))

    # The zero-initialised halves must receive a non-zero gradient, or the adapters never start.
    if mode.startswith(LORA_FAMILY):
        layout = lora_layout(model)
        assert layout
        for module, tensors in layout.items():
            grown = "lora_E" if mode == "sam_adalora" else "lora_B"
            assert tensors[grown].grad.abs().sum() > 0, f"{module}.{grown}"
            if mode in ("sam_lora", "sam_dora", "sam_lora+conv"):  # B = 0, so A's gradient is exactly zero
                assert torch.count_nonzero(tensors["lora_A"].grad) == 0
            if mode == "sam_dora":
                assert tensors["lora_magnitude_vector"].grad.abs().sum() > 0
    elif mode == "sam_adpt":
        for module, tensors in adapter_layout(model).items():
            assert tensors["up.weight"].grad.abs().sum() > 0, module
            assert tensors["up.bias"].grad.abs().sum() > 0, module
    elif mode == "sam_full":
        assert model.image_encoder.patch_embed.state_dict() and all(
            p.grad.abs().sum() > 0 for n, p in model.image_encoder.named_parameters()
            if n.startswith("patch_embed.") and p.dim() > 1)


# ----------------------------------------------------------------------------- 4. AdaLoRA
def adalora_run(total_steps: int = 30):
    model, adaptation = adapted("sam-tiny", "sam_adalora", total_steps=total_steps,
                                adalora_init_r=6, adalora_target_r=2)
    model.train()
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=2e-3)
    return model, adaptation, optimizer


def adalora_step(model, adaptation, optimizer, step: int) -> None:
    loss = task_loss(forward(model)) + adaptation.extra_loss()
    loss.backward()
    optimizer.step()
    adaptation.after_backward(step)
    optimizer.zero_grad(set_to_none=True)


def lora_e(model) -> dict[str, torch.Tensor]:
    return {m: t["lora_E"].detach().clone() for m, t in lora_layout(model).items()}


def test_adalora_prunes_to_the_target_budget_with_one_allocator() -> None:
    total, linears = 30, 4 * SAM_TINY["depth"]
    model, adaptation, optimizer = adalora_run(total)
    budget = adaptation.budget
    assert adaptation.total_rank() == 6 * linears
    assert (budget.init_budget, budget.target_budget) == (6 * linears, 2 * linears)
    schedule = adaptation.tuner.schedule
    assert (schedule.total_step, schedule.tinit, schedule.tfinal, schedule.deltaT) == (30, 3, 6, 1)

    ranks, snapshot = [], None
    for step in range(1, total + 1):
        adalora_step(model, adaptation, optimizer, step)
        assert adaptation.budget is budget, f"a new rank budget appeared at step {step}"
        ranks.append(adaptation.total_rank())
        if step == 12:
            assert budget.scores, "the budget in use accumulates the importance scores"
            snapshot = dict(weights={k: v.clone() for k, v in model.state_dict().items()},
                            optimizer=io.BytesIO(), mode=io.BytesIO())
            torch.save(optimizer.state_dict(), snapshot["optimizer"])
            torch.save(adaptation.state_dict(), snapshot["mode"])
        if step == 16:
            at_step_16 = (ranks[-1], lora_e(model))

    assert ranks[:3] == [6 * linears] * 3, "no pruning during the warm-up (tinit = 10% of 30 steps)"
    for step in range(4, 25):  # the cubic budget schedule between warm-up and final phase
        budget = int(4 * linears * (1 - (step - 3) / 21) ** 3 + 2 * linears)
        assert ranks[step - 1] <= budget, (step, ranks)
    assert 2 * linears < ranks[9] < 6 * linears
    assert ranks[-1] <= 2 * linears and ranks[-1] >= 2 * linears - 2, ranks
    assert len(set(ranks[23:])) == 1, "ranks stay fixed during the final phase"
    kept = sum(sum(pattern) for pattern in adaptation.tuner.rank_pattern.values())
    assert kept == 2 * linears == ranks[-1]
    nonzero = sum(int(torch.count_nonzero(e)) for e in lora_e(model).values())
    assert nonzero <= kept, "the pruned singular values are exactly zero"

    # Resume at step 12 (weights + optimizer + the mode's allocator state, as last.pt holds them):
    # steps 13..16 must then repeat the uninterrupted run exactly.
    resumed, resumed_adaptation, resumed_optimizer = adalora_run(total)
    resumed.load_state_dict(snapshot["weights"])
    resumed_optimizer.load_state_dict(torch.load(io.BytesIO(snapshot["optimizer"].getvalue())))
    state = torch.load(io.BytesIO(snapshot["mode"].getvalue()), weights_only=False)
    resumed_adaptation.load_state_dict(state)
    reloaded = resumed_adaptation.state_dict()
    assert set(reloaded) == set(state) == {"ipt", "exp_avg_ipt", "exp_avg_unc", "rank_pattern"}
    assert reloaded["rank_pattern"] == state["rank_pattern"] and state["rank_pattern"]
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        assert set(reloaded[key]) == set(state[key]) and state[key]
        assert all(torch.equal(reloaded[key][n], state[key][n]) for n in state[key])
    for step in range(13, 17):
        adalora_step(resumed, resumed_adaptation, resumed_optimizer, step)
    assert resumed_adaptation.total_rank() == at_step_16[0]
    for module, value in at_step_16[1].items():
        torch.testing.assert_close(lora_e(resumed)[module], value, atol=1e-6, rtol=0)


def peft_adalora_run(total_steps: int):
    """adalora_run's net adapted by peft's own AdaLoraModel instead: the same seed-0 base, decoder trained, and
    the same starting tensors (checked); its orthogonality loss is the mode's regulariser over peft's layers."""
    model = build("sam-tiny").requires_grad_(False)
    model.mask_decoder.requires_grad_(True)
    defaults = Config()
    schedule = adalora_schedule(total_steps, defaults.adalora_tinit, defaults.adalora_tfinal, defaults.adalora_delta_t)
    config = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=6, target_modules=model.adapt_targets.linears, **schedule)
    tuner = AdaLoraModel(model.image_encoder, config, "default")
    model.train()
    layers = RankBudget(tuner.model, tuner.peft_config["default"])  # only for its parameter lists
    orthogonality = lambda: defaults.adalora_orth_reg * orthogonal_regulariser(layers.params[0::3],  # noqa: E731
                                                                                layers.params[2::3])
    return model, tuner, orthogonality, torch.optim.AdamW(trainable(model).values(), lr=2e-3)


def test_rank_budget_follows_peft_rank_allocator_step_for_step() -> None:
    """Two identical runs, one pruned by our RankBudget on our layers, one by peft's own update_and_allocate
    on peft's layers: the same importance scores, the same allocation at every step, the same singular values."""
    total = 30
    model, adaptation, optimizer = adalora_run(total)
    peft_model, tuner, orthogonality, peft_optimizer = peft_adalora_run(total)
    assert all(torch.equal(value, peft_model.state_dict()[key]) for key, value in model.state_dict().items())
    for step in range(1, total + 1):
        for net, extra, opt in ((model, adaptation.extra_loss, optimizer), (peft_model, orthogonality, peft_optimizer)):
            (task_loss(forward(net)) + extra()).backward()
            opt.step()
        adaptation.after_backward(step)
        tuner.update_and_allocate(step)
        allocator, budget = tuner.rankallocator, adaptation.budget
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            theirs, mine = getattr(allocator, key), budget.state_dict()[key]
            assert set(mine) == set(theirs), (step, key)
            for name in theirs:
                torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-9)
        assert adaptation.tuner.rank_pattern == tuner.peft_config["default"].rank_pattern, f"allocation at step {step}"
        for name, value in lora_e(peft_model).items():
            torch.testing.assert_close(lora_e(model)[name], value, rtol=1e-4, atol=1e-7)
        for opt in (optimizer, peft_optimizer):
            opt.zero_grad(set_to_none=True)
    assert sum(sum(kept) for kept in adaptation.tuner.rank_pattern.values()) == budget.target_budget


def test_adalora_orthogonal_init_starts_orthonormal_at_the_base_and_moves_the_encoder_further() -> None:
    base = build("sam-tiny").eval()
    with torch.no_grad():
        expected = forward(base)
    runs = {}
    for init in ("gaussian", "orthogonal"):
        torch.manual_seed(0)
        model, adaptation = adapted("sam-tiny", "sam_adalora", adalora_init=init)
        runs[init] = model, adaptation
    model, adaptation = runs["orthogonal"]
    for tensors in lora_layout(model).values():
        a, b = tensors["lora_A"], tensors["lora_B"]
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0)
        assert not tensors["lora_E"].any()
    assert adaptation.extra_loss().item() < 1e-5  # the regulariser is satisfied from the start
    gaussian = next(iter(lora_layout(runs["gaussian"][0]).values()))["lora_A"]
    assert 0.015 < gaussian.std().item() < 0.025  # the default stays peft's N(0, 0.02)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(model), expected)  # E = 0: the adapted net starts as the base
    # one identical Adam step on E alone: the orthonormal vectors turn it into a larger weight change
    changes = {}
    for init, (model, _) in runs.items():
        model.train()
        values = [t["lora_E"] for t in lora_layout(model).values()]
        optimizer = torch.optim.Adam(values, lr=1e-2)
        task_loss(forward(model)).backward()
        optimizer.step()
        changes[init] = sum((t["lora_B"] @ (t["lora_A"] * t["lora_E"])).norm().item()
                            for t in lora_layout(model).values())
    assert changes["orthogonal"] > 3 * changes["gaussian"] > 0


def test_adalora_extra_loss_is_the_orthogonality_term() -> None:
    model, adaptation = adapted("sam-tiny", "sam_adalora")
    extra = adaptation.extra_loss()
    assert extra.dim() == 0 and extra.requires_grad and extra.item() > 0
    terms = []
    for module, tensors in lora_layout(model).items():
        a, b = tensors["lora_A"], tensors["lora_B"]
        terms.append(torch.linalg.norm(a @ a.T - torch.eye(a.shape[0])))
        terms.append(torch.linalg.norm(b.T @ b - torch.eye(b.shape[1])))
    torch.testing.assert_close(extra, Config().adalora_orth_reg * torch.stack(terms).mean())
    extra.backward()
    for module, tensors in lora_layout(model).items():
        assert tensors["lora_A"].grad.abs().sum() > 0 and tensors["lora_B"].grad.abs().sum() > 0
        assert tensors["lora_E"].grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("image_encoder."))


# ----------------------------------------------------------------------------- 5. batched decoding
@pytest.mark.parametrize("num_classes", (1, 2))
@pytest.mark.parametrize("kind", ("click", "box", "none"))
def test_batch_of_two_equals_two_single_images(num_classes: int, kind: str) -> None:
    model = build("sam-tiny", num_classes).eval()
    prompts = {"click": clicks(2, num_classes), "box": boxes(2, num_classes), "none": Prompts()}[kind]

    def row(i: int) -> Prompts:
        pick = lambda t: None if t is None else t[i:i + 1]
        return Prompts(pick(prompts.points), pick(prompts.point_labels), pick(prompts.boxes))

    with torch.no_grad():
        logits, iou = model(images(2), prompts)
        singles = [model(images(2)[i:i + 1], row(i)) for i in range(2)]
    assert logits.shape == (2, num_classes, SIZE // 4, SIZE // 4) and iou.shape == (2, num_classes)
    for i, (single_logits, single_iou) in enumerate(singles):
        torch.testing.assert_close(logits[i:i + 1], single_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(iou[i:i + 1], single_iou, atol=1e-5, rtol=0)
    assert (logits[0] - logits[1]).abs().max() > 1e-4, "the two images must not share one output"
    if num_classes == 2:
        assert (logits[:, 0] - logits[:, 1]).abs().max() > 1e-4, "classes read different mask tokens"


# ----------------------------------------------------------------------------- 6. checkpointing
@pytest.mark.parametrize("net,mode", [("sam-tiny", "sam_lora"), ("mobile_sam", "sam_adpt"),
                                      ("mobile_sam", "sam_full")])
def test_activation_checkpointing_keeps_outputs_gradients_and_keys(net: str, mode: str) -> None:
    runs = {}
    for checkpointed in (False, True):
        model, _ = adapted(net, mode)
        perturb_(encoder_adapter_params(model).values() if mode != "sam_full" else [])
        keys = list(model.state_dict())
        if checkpointed:
            assert enable_activation_checkpointing(model) == {"sam-tiny": 2, "mobile_sam": 12}[net]
            assert list(model.state_dict()) == keys
        block = model.image_encoder.blocks[0] if net == "sam-tiny" else model.image_encoder.layers[1].blocks[0]
        calls = []  # a hook inside the block: it also fires when backward recomputes the block
        block.attn.register_forward_hook(lambda *_: calls.append(1))
        model.train()
        keep_frozen_batchnorm_in_eval(model)
        logits = forward(model)
        task_loss(logits).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        runs[checkpointed] = (logits.detach(), grads, buffers, len(calls))
    (plain_logits, plain_grads, plain_buffers, plain_runs), (logits, grads, buffers, ckpt_runs) = runs[False], runs[True]
    assert (plain_runs, ckpt_runs) == (1, 2), "checkpointed blocks run again in backward"
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=0)
    assert set(grads) == set(plain_grads) and len(grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # BatchNorm running statistics (MobileSAM's, trained in sam_full) are updated once per step, not twice
    for name, value in plain_buffers.items():
        torch.testing.assert_close(buffers[name], value, atol=1e-6, rtol=0, msg=name)
    with torch.no_grad():  # and in eval mode the wrapped blocks run as before
        assert forward(model.eval()).shape == plain_logits.shape


@pytest.mark.parametrize("mode", ["sam_lora", "sam_adpt"])
def test_mlp_recompute_reruns_fc1_in_backward_with_the_same_gradients(mode: str) -> None:
    runs = {}
    for recompute in (False, True):
        model, _ = adapted("mobile_sam", mode)
        perturb_(encoder_adapter_params(model).values())
        if recompute:
            assert enable_mlp_recompute(model) == 10  # every attention block of TinyViT-5M (stages 1-3: 2 + 6 + 2)
        calls = []
        model.image_encoder.layers[1].blocks[0].mlp.fc1.register_forward_hook(lambda *_: calls.append(1))
        model.train()
        keep_frozen_batchnorm_in_eval(model)
        logits = forward(model)
        task_loss(logits).backward()
        runs[recompute] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                           len(calls))
    (plain_logits, plain_grads, plain_calls), (logits, grads, calls) = runs[False], runs[True]
    assert (plain_calls, calls) == (1, 2)
    torch.testing.assert_close(logits, plain_logits, atol=0, rtol=0)
    assert set(grads) == set(plain_grads) and len(grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=0, rtol=0, msg=name)


def test_mlp_recompute_needs_a_tiny_vit_encoder() -> None:
    model, _ = adapted("sam-tiny", "sam_lora")
    with pytest.raises(ValueError, match="no TinyViT MLP"):
        enable_mlp_recompute(model)


# ----------------------------------------------------------------------------- 7. merging
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode", LORA_FAMILY)
def test_merge_folds_adapters_into_official_layout(net: str, mode: str, tmp_path: Path) -> None:
    model, adaptation = adapted(net, mode, lora_conv=net == "mobile_sam" and mode == "sam_lora")
    perturb_(encoder_adapter_params(model).values(), scale=0.2)
    model.eval()
    base = build(net).eval()
    with torch.no_grad():
        unmerged = forward(model)
        assert (unmerged - forward(base)).abs().max() > 1e-3, "the perturbed adapters must matter"
        merge_adapters(adaptation)
        merged = forward(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    assert adaptation.tuner is None
    state = model.state_dict()
    assert list(state) == list(base.state_dict())
    assert not [k for k in state if "lora" in k or "base_layer" in k]
    assert all(state[k].shape == v.shape for k, v in base.state_dict().items())

    net_name, encoder, overrides = ("sam", "vit_b", SAM_TINY) if net == "sam-tiny" else ("mobile_sam", "tiny_vit", {})
    exported = official_state(model, net_name, encoder)
    assert set(exported) == set(state) and all(isinstance(v, torch.Tensor) for v in exported.values())
    path = tmp_path / "merged.pth"
    torch.save(exported, path)
    reloaded = build_segmenter(net_name, encoder, SIZE, 1, checkpoint=str(path), **overrides).eval()
    with torch.no_grad():
        # 1e-5: the merged net's frozen TinyViT prefix runs in channels-last, the reloaded (trainable) one not
        torch.testing.assert_close(forward(reloaded), merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", [m for m in ALL_MODES if not get_mode(m).mergeable])
def test_merge_rejects_unmergeable_modes(mode: str) -> None:
    model, adaptation = adapted("sam-tiny", mode)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=f"{mode} cannot be merged"):
        merge_adapters(adaptation)
    assert list(model.state_dict()) == keys


def test_merge_leaves_modes_without_adapters_alone() -> None:
    for mode in [m for m in ALL_MODES if not get_mode(m).adapter_prefix]:
        model, adaptation = adapted("sam-tiny", mode)
        keys = list(model.state_dict())
        merge_adapters(adaptation)
        assert list(model.state_dict()) == keys


# ----------------------------------------------------------------------------- 8. adapter checkpoints
def test_adapter_weights_round_trip(tmp_path: Path) -> None:
    model, _ = adapted("sam-tiny", "sam_lora")
    perturb_(trainable(model).values())
    model.eval()
    path = tmp_path / "best.safetensors"
    save_weights(path, model, full=False, metadata={"mod": "sam_lora"})
    fresh, _ = adapted("sam-tiny", "sam_lora")
    fresh.eval()
    with torch.no_grad():
        expected = forward(model)
        assert (forward(fresh) - expected).abs().max() > 1e-3
        load_weights(path, fresh, full=False)
        assert torch.equal(forward(fresh), expected)


def test_full_weights_round_trip(tmp_path: Path) -> None:
    model, _ = adapted("mobile_sam", "sam_full")
    perturb_(model.parameters(), scale=0.01)
    model.eval()
    path = tmp_path / "last.safetensors"
    save_weights(path, model, full=True, metadata={})
    fresh, _ = adapted("mobile_sam", "sam_full")
    fresh.eval()
    load_weights(path, fresh, full=True)
    with torch.no_grad():
        assert torch.equal(forward(fresh), forward(model))


@pytest.mark.parametrize("source,problem", [(("sam-tiny", "sam_adpt"), "missing"),
                                            (("sam-tiny", "sam_dora"), "unexpected"),
                                            (("mobile_sam", "sam_lora"), "missing")])
def test_adapter_weights_from_another_mode_or_net_are_rejected(tmp_path: Path, source, problem: str) -> None:
    other, _ = adapted(*source)
    path = tmp_path / f"{source[0]}_{source[1]}.safetensors"
    save_weights(path, other, full=False, metadata={})
    model, _ = adapted("sam-tiny", "sam_lora")
    with pytest.raises(UserError) as error:
        load_weights(path, model, full=False)
    assert str(path) in str(error.value) and problem in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        load_weights(tmp_path / "absent.safetensors", model, full=False)


# ----------------------------------------------------------------------------- -decoder
DECODER_MODES = tuple(m for m in ALL_MODES if "decoder" in get_mode(m).options)
# the mask decoder's transformer linears that `-decoder lora` adapts: per layer self, token->image and
# image->token attention (q, k, v, out) and the MLP (lin1, lin2); then the final token->image attention
DECODER_LINEARS = {f"mask_decoder.transformer.layers.{i}.{attn}.{proj}" for i in range(2)
                   for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
                   for proj in ("q_proj", "k_proj", "v_proj", "out_proj")} | \
    {f"mask_decoder.transformer.layers.{i}.mlp.lin{j}" for i in range(2) for j in (1, 2)} | \
    {f"mask_decoder.transformer.final_attn_token_to_image.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}


@pytest.mark.parametrize("decoder", ("full", "lora", "frozen"))
@pytest.mark.parametrize("mode", DECODER_MODES)
def test_decoder_setting_fixes_what_trains_in_the_decoder(mode: str, decoder: str) -> None:
    model, adaptation = adapted("mobile_sam", mode, decoder=decoder)
    in_decoder = {n for n in trainable(model) if n.startswith("mask_decoder.")}
    assert {n for n in trainable(model) if not n.startswith("mask_decoder.")}, "the encoder adapters still train"
    if decoder == "full":
        assert in_decoder == {n for n, _ in model.mask_decoder.named_parameters(prefix="mask_decoder")}
    elif decoder == "frozen":
        assert not in_decoder and adaptation.decoder_tuner is None
    else:
        adapted_modules = {n.split(".lora_")[0] for n in in_decoder}
        assert adapted_modules == DECODER_LINEARS and all(".lora_" in n for n in in_decoder)
        rank = 4 if mode in ("sam_adpt", "sam_lora", "sam_dora") else Config().adalora_target_r
        a = dict(model.named_parameters())["mask_decoder.transformer.layers.0.mlp.lin1.lora_A.default.weight"]
        assert a.shape[0] == rank


def test_decoder_lora_trains_merges_and_exports_the_official_layout() -> None:
    model, adaptation = adapted("mobile_sam", "sam_lora", decoder="lora")
    perturb_([p for n, p in trainable(model).items() if "lora_B" in n], scale=0.2)
    loss = task_loss(forward(model))
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads <= set(trainable(model)) and any(n.startswith("mask_decoder.") for n in grads)
    model.eval()
    with torch.no_grad():
        unmerged = forward(model)
        merge_adapters(adaptation)
        merged = forward(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    assert adaptation.decoder_tuner is None
    assert list(model.state_dict()) == list(build("mobile_sam").state_dict())


# ----------------------------------------------------------------------------- DDP find_unused_parameters
DECODER_SETTINGS = tuple((m, d) for m in ALL_MODES for d in (("full", "lora", "frozen") if m in DECODER_MODES
                                                              else (None,)))


@pytest.mark.parametrize(("mode", "decoder"), DECODER_SETTINGS)
def test_parameters_without_gradient_are_listed_per_mode_and_decoder(mode: str, decoder: str | None) -> None:
    """trainable_without_gradient (DDP's find_unused_parameters) lists every trainable parameter that a step
    with the engine's loss (logits only) leaves without a gradient, for click and box prompts, one and two
    classes; it is empty exactly when every trainable parameter gets one (-decoder lora / frozen)."""
    from models.modes.adaptation import trainable_without_gradient

    options = {} if decoder is None else {"decoder": decoder}
    for net in NETS:
        listed, missing_grad = None, set()
        for classes, prompts in ((1, clicks(2, 1)), (2, boxes(2, 2))):
            model, _ = adapted(net, mode, num_classes=classes, **options)
            listed = set(trainable_without_gradient(model))
            assert listed <= set(trainable(model))
            task_loss(forward(model, prompts)).backward()
            missing_grad |= {n for n, p in trainable(model).items() if p.grad is None}
        assert missing_grad <= listed, f"{net} {mode}: no gradient but not listed: {sorted(missing_grad - listed)}"
        assert bool(listed) == bool(missing_grad), f"{net} {mode} {decoder}: listed {sorted(listed)[:3]}"
        assert bool(listed) == (decoder in (None, "full"))  # sam_full and sam_decoder train the whole decoder
