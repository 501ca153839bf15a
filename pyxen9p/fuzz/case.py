"""Cases, steps and findings of the backend fuzzer: plain data, JSON in and out.

A :class:`Case` is a list of steps, each a JSON object ``{"op": NAME, ...}``
that :mod:`pyxen9p.fuzz.execute` knows how to perform.  A case made by the
generator remembers the ``(seed, number)`` it came from: the same pair
always gives the same steps (:func:`pyxen9p.fuzz.generate.generate_case`).
A shrunk case keeps them too, with fewer steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FINDING_KINDS", "Case", "Finding", "Step"]

#: One step: ``{"op": NAME, ...arguments}``; every value is JSON.
Step = dict[str, Any]

#: What an oracle can report, with a one-line explanation.
FINDING_KINDS: dict[str, str] = {
    "backend-gone": "the backend process (or simulated backend) died or was replaced",
    "state-invalid": "the backend wrote a XenBus state outside 0..8 or removed its state",
    "close-ignored": "the backend stayed Connected after the frontend closed",
    "no-reply": "a well-framed request on a clean, connected ring got no reply in time",
    "ring-index": "the backend's ring index moved beyond the ring's size",
    "reply-size": "a reply header announced a size below 7 or beyond the ring",
    "stray-reply": "a reply carried a tag no request was waiting for, or came on another ring",
    "escape": "a file appeared outside the exported directory",
}


@dataclass
class Case:
    """One fuzz case.

    :ivar seed: the run's seed
    :ivar number: the case's number in the run
    :ivar layer: the layer its generator aimed at (``xenbus``, ``ring``, ``p9``)
    :ivar steps: the steps, in order
    """

    seed: int
    number: int
    layer: str
    steps: list[Step] = field(default_factory=list)

    def with_steps(self, steps: list[Step]) -> Case:
        """The same case with other steps (for shrinking)."""
        return Case(self.seed, self.number, self.layer, [dict(s) for s in steps])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"seed": self.seed, "number": self.number, "layer": self.layer,
                "steps": self.steps}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        """Build a case from :meth:`to_json`'s form.

        :raises ValueError: a field is missing or of the wrong type
        """
        try:
            steps = data["steps"]
            if not isinstance(steps, list) or not all(
                isinstance(s, dict) and isinstance(s.get("op"), str) for s in steps
            ):
                raise ValueError("steps must be a list of {'op': ...} objects")
            return cls(int(data["seed"]), int(data["number"]), str(data["layer"]), steps)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a fuzz case: {exc}") from None

    def dumps(self) -> str:
        """The case as indented JSON."""
        return json.dumps(self.to_json(), indent=1, sort_keys=True)


@dataclass
class Finding:
    """What an oracle saw.

    :ivar kind: a key of :data:`FINDING_KINDS`
    :ivar detail: one line: what exactly was seen
    :ivar step: the index of the step after which it was seen (-1: at the end)
    :ivar evidence: name -> text (backend log, ``xl dmesg``, XenStore nodes)
    :ivar signature: what tells this failure from others of its kind (for a
        dead backend: its assertion or its fault address); shrinking keeps it
    """

    kind: str
    detail: str
    step: int = -1
    evidence: dict[str, str] = field(default_factory=dict)
    signature: str = ""

    def summary(self) -> str:
        """``kind: detail`` (and the signature, if any)."""
        sig = f" [{self.signature}]" if self.signature and self.signature != self.kind else ""
        return f"{self.kind}: {self.detail}{sig}"

    @property
    def key(self) -> tuple[str, str]:
        """``(kind, signature)``: two findings with the same key are one bug."""
        return self.kind, self.signature
