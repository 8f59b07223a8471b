"""Measure every net x mode (x -amp, x -grad_ckpt, x -host_memory) in one run: a markdown table plus CSV.

    python benchmark.py -nets sam:vit_b,mobile_sam:tiny_vit -mods sam_lora,sam_adpt -image_size 256 -b 2
"""
from common.cli import run_cli


def main(argv=None) -> None:
    import csv
    import dataclasses
    import itertools
    import statistics
    from pathlib import Path

    from cfg import parse_args, parse_modes
    from common.errors import UserError

    config, _ = parse_args("benchmark", argv)  # before the heavy imports

    from engine.benchmark import COLUMNS, PLAIN, benchmark_table, machine_description, run_benchmark
    from engine.runtime import resolve_device
    from models.modes import get_mode
    from models.registry import resolve_encoder

    decoders = (config.decoders or config.decoder).split(",")
    unknown = [d for d in decoders if d not in ("full", "lora", "frozen")]
    if unknown:
        raise UserError(f"-decoders: unknown setting {unknown[0]}; choose from full, lora, frozen")
    recomputes = config.grad_ckpt_options.split(",")
    unknown = [r for r in recomputes if r not in ("0", "1", "mlp")]
    if unknown:
        raise UserError(f"-grad_ckpt_options: unknown setting {unknown[0]}; choose from 0, 1, mlp")
    configs = []
    for pair in config.nets.split(","):
        net, _, encoder = pair.partition(":")
        encoder = resolve_encoder(net, encoder or "default")
        if "mlp" in recomputes and encoder != "tiny_vit":
            raise UserError(f"-grad_ckpt_options mlp needs TinyViT nets (lite_medsam, mobile_sam), not {pair}")
        for amp in config.amp_options.split(","):
            if not config.no_plain:
                configs.append(dataclasses.replace(config, net=net, encoder=encoder, mod=PLAIN, amp=amp,
                                                   grad_ckpt=False, host_memory="system"))
            for mod in parse_modes(config.mods):
                trains_encoder = get_mode(mod).trains_encoder
                for decoder in decoders if "decoder" in get_mode(mod).options else [config.decoder]:
                    for ckpt, host_memory in itertools.product(recomputes, config.host_memory_options.split(",")):
                        row = dataclasses.replace(config, net=net, encoder=encoder, mod=mod, amp=amp, decoder=decoder,
                                                  grad_ckpt=ckpt == "1" and trains_encoder,
                                                  recompute_mlp=ckpt == "mlp" and trains_encoder,
                                                  host_memory=host_memory)
                        if row not in configs:  # a frozen encoder has nothing to recompute: one row
                            configs.append(row)
    rows, references = run_benchmark(configs, config.steps, config.warmup, config.rounds)
    machine = machine_description(resolve_device(config.device))
    reference = (f"float32 matmul reference {statistics.median(references):.1f} GFLOP/s (median; "
                 f"{min(references):.1f}-{max(references):.1f} over the measurements right before and after "
                 f"each row, whose mean is the row's matmul_reference)")
    if config.rounds > 1:
        reference += (f"; {config.rounds} rounds, each row: its median round, the fastest and slowest round's "
                      f"s/step, its highest peak")
    table = (f"Machine: {machine}; {reference}; image size "
             f"{config.image_size}, batch {config.b}, {config.steps} timed steps; random base weights; "
             f"{PLAIN}: a plain PyTorch full fine-tuning step of the same net, the base of the *_vs_plain "
             f"ratios.\n\n"
             + benchmark_table(rows))
    print(table)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    run_cli(main)
