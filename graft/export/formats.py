"""What an export format is: the heads it takes, the checks it makes before anything is loaded,
and its writer. Each format lives in its own module of this package and is registered in
`graft.registry.FORMATS`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import GraftConfig, GraftError


# options that only some formats take, and what they mean
OWN_OPTIONS = {"verifier": "the target model of an eagle3 export"}


@dataclass(frozen=True)
class Format:
    """name: the `--format` value. family: the head family it takes (None: any). write(folder,
    model, options): fills the temporary folder the export is renamed from. check(config,
    options): refuses what the format cannot express, in one line, before the slow load.
    backbone: whether it holds the backbone (the serving formats hold the heads alone).
    takes: the format's own `export` options (refused with other formats).
    options: the `export` keyword arguments (dtype, tree_size, verifier, ...)."""

    name: str
    write: Callable
    family: str | None = None
    check: Callable[[GraftConfig, dict], None] | None = None
    backbone: bool = False
    takes: tuple[str, ...] = ()

    def refuse(self, config: GraftConfig, src: str, options: dict) -> None:
        for name, what in OWN_OPTIONS.items():
            if options.get(name) and name not in self.takes:
                raise GraftError(f"--{name} names {what}: leave it out with --format {self.name}")
        if self.family and config.heads.family != self.family:
            raise GraftError(f"--format {self.name} takes {self.family} heads; {src} holds {config.heads.family} "
                             "heads, which no serving engine loads yet: use the default format")
        if not self.backbone and config.lora:
            raise GraftError(f"{src} trained LoRA adapters, so its backbone changed: a serving export holds the heads "
                             "alone and would pair them with the original backbone")
        if self.check is not None:
            self.check(config, options)
