"""Facts about tensor names, shared by the size budget, the flow's task groups and the report."""

from __future__ import annotations

import re

# "transformer_blocks.7.attn1.to_q.weight" -> block "transformer_blocks.7", module "attn1.to_q"
BLOCK_PATTERN = re.compile(r"(?:^|\.)(?P<block>[A-Za-z_]\w*\.\d+)\.(?P<module>.+?)(?:\.weight)?$")


def block_and_module(name: str) -> tuple[str, str]:
    """(``transformer_blocks.7``, ``attn1.to_q``) for a block tensor; ("", name) otherwise."""
    match = BLOCK_PATTERN.search(name)
    if match is None:
        return "", name.removesuffix(".weight")
    return match["block"], match["module"]


def block_index(name: str) -> int | None:
    """7 for ``transformer_blocks.7.attn1.to_q.weight``; None outside a numbered block."""
    block, _ = block_and_module(name)
    return int(block.rpartition(".")[2]) if block else None


def natural_key(text: str) -> list:
    """Sort key that orders ``block.2`` before ``block.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
