"""The loader interface: paired embeddings split into train/val/test, with retrieval ground truth.

Modality A is always audio; B is video or text (DESIGN.md 3.6). One A item may own several
B rows (5 captions per audio), so a split stores A and B separately plus, for every B row,
the A row it belongs to. That one index gives both the training pairs and the one-to-many
relevance for retrieval in either direction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


class DataError(ValueError):
    """Bad input data. The message is one line naming the file, the row or key, and the problem."""


@dataclass
class Split:
    a: torch.Tensor       # (N_a, D_A) unit-norm audio embeddings
    b: torch.Tensor       # (N_b, D_B) unit-norm video/text embeddings
    b_to_a: torch.Tensor  # (N_b,) int64: the row of `a` that each row of `b` is paired with

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pairs (a[b_to_a], b): (N_b, D_A), (N_b, D_B)."""
        return self.a[self.b_to_a], self.b

    def retrieval(self, direction: int):
        """(queries, gallery, relevant) for a direction: 0 is B->A, 1 is A->B.

        B->A: every B row queries the audio gallery; its one relevant item is b_to_a (Q,).
        A->B: every audio queries the B gallery; relevant is a (Q, G) bool mask of its B rows.
        """
        if direction == 0:
            return self.b, self.a, self.b_to_a
        rel = self.b_to_a[None, :] == torch.arange(len(self.a))[:, None]
        return self.a, self.b, rel


@dataclass
class Dataset:
    pair: str                       # "audio-video" or "audio-text"
    spec: str                       # how to load it again (stored in checkpoints)
    splits: dict[str, Split]        # "train", "val", "test"
    oracle: Optional[Callable] = field(default=None, repr=False)  # synthetic only: ceiling scores

    @property
    def dims(self) -> tuple[int, int]:
        s = self.splits["train"]
        return s.a.shape[1], s.b.shape[1]

    def summary(self) -> str:
        parts = [f"{k}: {len(s.a)} audio / {len(s.b)} {self.pair.split('-')[1]}" for k, s in self.splits.items()]
        return f"{self.spec} ({self.pair}, dims {self.dims[0]}/{self.dims[1]}): " + ", ".join(parts)
