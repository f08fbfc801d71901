"""Carrying a mix's KLD from the calibration text it was measured on to another text.

Every choice is measured on calibration text (groups_merged: prose, code, several languages, rare
tokens); a reader cares about the KLD on some other text, and it is not the same number, nor one
ratio away. Measured on Gemma 3 270M (dithered base) against wikitext-2: stock mixes and
allocations that keep the embedding high score 0.69-0.76 of their calibration KLD there, while
allocations that lower the 262k-token embedding score 0.54-0.66. The two kinds of error reach the
text differently: a block's error reaches every token, the embedding's only the rows of the tokens
a text uses (and, tied as Gemma's is, the output layer for every token).

So the move is measured per class, on the model and the two texts at hand: one reference change
per class (every block tensor at a 4-bit type; the embedding alone at a 4-bit type), each measured
in memory on both texts, and the ratio is that class's factor. A mix's KLD on the other text is
its calibration KLD split between the classes in proportion to the allocator's per-group
predictions (pipeline.choose.allocate.Allocation.group_kld), each share times its class's factor.
Four probes in all, whatever the number of mixes carried.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.choose.groups import group_of, low_type_for
from pipeline.errors import SqueezeError
from pipeline.formats.model_info import ModelInfo

EMBEDDING = "embedding"
BLOCKS = "blocks"

# A 4-bit type: far enough from the base that the KLD stands clear of the probe's noise, close
# enough that the second-order view the allocator uses still holds. Rows that do not fit its
# 256-wide blocks (Gemma 3 270M's 640 columns) take the 32-wide one.
REFERENCE_TYPE = "Q4_K"
REFERENCE_FALLBACK = "Q4_0"
# The factors are measured on this many chunks of the text carried to, taken after the chunks that
# text scores: a factor measured on the scored chunks themselves would predict them in-sample.
FACTOR_CHUNKS = 4


def class_of_group(group: str) -> str:
    return EMBEDDING if group == "token_embd" else BLOCKS


def reference_mixes(info: ModelInfo) -> dict[str, dict[str, str]]:
    """Per class, the change whose KLD on both texts gives the class's factor."""
    mixes: dict[str, dict[str, str]] = {EMBEDDING: {}, BLOCKS: {}}
    for t in info.quantizable():
        group = group_of(t.name)
        if group is not None:
            mixes[class_of_group(group)][t.name] = low_type_for(t.shape, REFERENCE_TYPE, REFERENCE_FALLBACK)
    return {cls: types for cls, types in mixes.items() if types}


def class_shares(group_kld: dict[str, float]) -> dict[str, float]:
    """Each class's share of a mix's predicted KLD (groups predicting nothing weigh nothing)."""
    totals: dict[str, float] = {}
    for group, kld in group_kld.items():
        cls = class_of_group(group)
        totals[cls] = totals.get(cls, 0.0) + max(float(kld), 0.0)
    whole = sum(totals.values())
    if whole <= 0:
        return {BLOCKS: 1.0}
    return {cls: v / whole for cls, v in totals.items()}


@dataclass(frozen=True)
class TextTransfer:
    text: str  # what the other text is, for the record
    factors: dict[str, float]  # class -> KLD on the other text / KLD on the calibration text
    references: dict[str, dict]  # class -> {"types": ..., "calibration_kld": ..., "other_kld": ...}
    held_out: bool | None = None  # whether the factors' chunks are apart from the chunks predicted

    def factor_for(self, shares: dict[str, float]) -> float:
        """The ratio for a mix whose KLD splits between the classes as `shares` (class_shares)."""
        blocks = self.factors.get(BLOCKS, next(iter(self.factors.values())))
        return sum(share * self.factors.get(cls, blocks) for cls, share in shares.items())

    def factor(self, group_kld: dict[str, float]) -> float:
        """The ratio for a mix whose predicted KLD splits over groups as `group_kld`."""
        return self.factor_for(class_shares(group_kld))

    def carry(self, calibration_kld: float, group_kld: dict[str, float]) -> float:
        """The mix's KLD on the other text, from its KLD on the calibration text."""
        return calibration_kld * self.factor(group_kld)

    def as_dict(self) -> dict:
        return {"text": self.text, "factors": dict(self.factors), "references": self.references,
                "held_out": self.held_out}

    @classmethod
    def from_dict(cls, data: dict) -> "TextTransfer":
        return cls(data["text"], dict(data["factors"]), dict(data["references"]), data.get("held_out"))


def measure_transfer(info: ModelInfo, calibration, other, text: str, held_out: bool | None = None) -> TextTransfer:
    """The per-class factors between the texts of two in-memory probes on the same base
    (pipeline.choose.memory_probe.MemoryProbe: `calibration`, and `other` on the text carried to)."""
    references = {}
    for cls, types in reference_mixes(info).items():
        cal, oth = calibration.kld(types), other.kld(types)
        if not cal > 0:
            raise SqueezeError(f"text transfer: the {cls} reference mix measured KLD {cal} on the calibration "
                               "text; expected a positive KLD to divide by (is the base already at that type?)")
        kinds = sorted(set(types.values()))
        references[cls] = {"types": "/".join(kinds), "tensors": len(types), "calibration_kld": cal, "other_kld": oth}
    if not references:
        raise SqueezeError(f"text transfer: this {info.arch} model has no tensors the allocator chooses types for")
    return TextTransfer(text, {cls: r["other_kld"] / r["calibration_kld"] for cls, r in references.items()}, references,
                        held_out)
