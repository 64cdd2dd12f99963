"""What `npt-ds eval --data SPEC` evaluates on: SPEC -> the DataConfig whose held-out windows `eval_batches` reads.

* a prepared dir (holds ``index.json``, from ``npt-ds prepare``) -> its windows in corpus order;
* one or more existing local files, comma-separated -> ``source: files`` with them as the held-out files;
* ``shakespeare`` -> the held-out plays (``--holdout``);
* anything else -> a hub dataset name, read from its ``--split`` split.
"""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .prepared import INDEX
from .sources import BUILDERS


def eval_data_config(spec: str | None, batches: int, seq_len: int, split: str = "validation",
                     holdout: list[str] | None = None) -> DataConfig:
    """One window per batch, `batches` windows of `seq_len` tokens from `spec` (None: the held-out plays)."""
    common = {"eval_batches": batches, "eval_seq_len": seq_len}
    if holdout:
        common["eval_holdout"] = holdout
    if spec is None or spec == "shakespeare":
        return DataConfig(**common)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / INDEX).is_file():
            raise ValueError(f"--data: {spec!r} is a directory but not a prepared dir (no {INDEX}); "
                             "create it with `npt-ds prepare SOURCE --split eval --tokenizer MODEL --out DIR`")
        return DataConfig(source="prepared", path=str(path), eval_path=str(path), **common)
    files = [f for f in spec.split(",") if f]
    if all(Path(f).expanduser().is_file() for f in files):
        return DataConfig(source="files", files=files, eval_files=files, **common)
    missing = [f for f in files if Path(f).suffix in BUILDERS and not Path(f).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"--data: file {missing[0]!r} not found; fix the path (or name a prepared dir, "
                                "'shakespeare' or a hub dataset)")
    return DataConfig(source=spec, eval_split=split, **common)


def describe(data: DataConfig) -> str:
    """One phrase naming what was evaluated, for the report line."""
    if data.eval_path:
        return f"prepared dir {data.eval_path}"
    if data.source == "files":
        return f"files {', '.join(map(str, data.eval_files))}"
    if data.source == "shakespeare":
        return f"held-out Shakespeare ({', '.join(data.eval_holdout)})"
    return f"{data.source} [{data.eval_split}]"
