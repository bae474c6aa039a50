"""`internlm-kit convert`."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    src: Path = typer.Argument(..., metavar="SRC", help="InternLM2 model folder (safetensors or .bin, sharded or not)."),
    dst: Path = typer.Argument(..., metavar="DST", help="New folder for the Llama-layout model."),
    dtype: str = typer.Option("auto", "--dtype", metavar="DTYPE", help="auto (as stored) | bf16 | fp16 | fp32."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it is not empty."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", metavar="SIZE",
                                       help="Largest output shard, e.g. 2GB, 500MB."),
) -> None:
    """Convert an InternLM2 checkpoint to the standard Llama layout.

    The result loads with AutoModelForCausalLM / AutoTokenizer without trust_remote_code, and in
    vLLM and llama.cpp's converter; the chat tokens keep their ids.
    """
    import sys

    from setup_kit.convert import convert_checkpoint
    from setup_kit.doctor import short_dtype
    from setup_kit.errors import UsageError

    limit = _parse_size(max_shard_size, UsageError)
    last = [-1]

    def progress(done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        if percent != last[0]:
            last[0] = percent
            print(f"\r  weights: {done / 1e6:,.1f} / {total / 1e6:,.1f} MB ({percent}%)",
                  end="", file=sys.stderr, flush=True)

    print(f"Converting {src} -> {dst}", file=sys.stderr)
    try:
        result = convert_checkpoint(src, dst, dtype=short_dtype(dtype), force=force, max_shard_bytes=limit,
                                    progress=progress)
    except KeyboardInterrupt:
        # convert_checkpoint has removed its temporary folder; DST is as it was.
        print(f"\ninternlm-kit: convert interrupted; {dst} was left as it was.", file=sys.stderr)
        raise typer.Exit(130) from None
    print(file=sys.stderr)
    rate = result.bytes_written / 1e6 / max(result.weight_seconds, 1e-9)
    shards = "1 shard" if result.shards == 1 else f"{result.shards} shards"
    typer.echo(f"Wrote {result.dst}: {result.tensors} tensors in {shards}, "
               f"{result.bytes_written / 1e6:,.1f} MB {result.dtype}, {result.seconds:.1f} s "
               f"(weights {result.weight_seconds:.1f} s, {rate:,.0f} MB/s; the rest is the tokenizer).")
    typer.echo(f"Load it with AutoModelForCausalLM.from_pretrained({str(result.dst)!r}) or "
               f"internlm-kit chat --model {result.dst}")


def _parse_size(text: str, error) -> int:
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise error(f"--max-shard-size {text!r} is not a size.", "Write it like 2GB or 500MB.") from None
    if size <= 0:
        raise error(f"--max-shard-size {text!r} must be positive.", "Write it like 2GB or 500MB.")
    return size
