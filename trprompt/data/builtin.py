"""Row preparation for the built-in benchmarks: each turns one raw source row into the task fields.

A hook takes the raw row and the pool it came from (``train``/``test``/``all``) and returns a mapping
with ``question``, ``answer``, optionally ``solution`` and ``metadata``. The hooks hold only what is
particular to a source file (GSM8K's ``#### N`` line, SVAMP's Body + Question, MATH's boxed answer);
ids, validation and splits follow the one path in :mod:`trprompt.data.tasks`, as for a user's file.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from trprompt.grading import find_boxed

__all__ = ["format_float", "gsm8k_row", "gsm_hard_row", "math_row", "normalize_question", "svamp_row"]


def format_float(x: float) -> str:
    """Plain decimal text for a float: ``5.0`` -> ``"5"``, ``2.0107e-06`` -> ``"0.0000020107"``.

    Uses the shortest round-trip digits (as ``repr`` does) but never scientific notation.
    """
    text = format(Decimal(repr(float(x))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def normalize_question(text: str) -> str:
    """Whitespace-normalised question text (how questions are matched across train and test)."""
    return re.sub(r"\s+", " ", text).strip()


def gsm8k_row(row: dict[str, Any], pool: str) -> dict[str, Any]:
    """GSM8K: the worked solution's last ``#### N`` line is the answer (thousands commas dropped)."""
    final = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
    return {"question": row["question"], "answer": final, "solution": row["answer"]}


def gsm_hard_row(row: dict[str, Any], pool: str) -> dict[str, Any]:
    """GSM-Hard: ``input`` is the question, the float ``target`` written as plain decimal text."""
    return {
        "question": row["input"],
        "answer": format_float(float(row["target"])),
        "metadata": {"code": row.get("code"), "idx": row.get("idx"), "target": row["target"]},
    }


def math_row(row: dict[str, Any], pool: str) -> dict[str, Any]:
    r"""MATH: MATH-500 rows (test) carry ``answer``; other MATH rows (train) have it in ``\boxed{}``."""
    if pool == "test":
        return {
            "question": row["problem"],
            "answer": row["answer"],
            "solution": row["solution"],
            "metadata": {"level": int(row["level"]), "type": row["subject"], "unique_id": row["unique_id"]},
        }
    answer = find_boxed(row["solution"])
    if answer is None:  # every row has one in the vendored file; keep the loader strict anyway
        raise ValueError("no \\boxed{} answer in the solution")
    level = re.search(r"\d+", str(row["level"]))
    return {
        "question": row["problem"],
        "answer": answer,
        "solution": row["solution"],
        "metadata": {"level": int(level.group(0)) if level else None, "type": row["type"]},
    }


def svamp_row(row: dict[str, Any], pool: str) -> dict[str, Any]:
    """SVAMP: Body and Question joined (the body ends with a period when it has no final punctuation)."""
    body, question = row["Body"].strip(), row["Question"].strip()
    if body and body[-1] not in ".?!":
        body += "."
    return {
        "question": f"{body} {question}".strip(),
        "answer": format_float(float(row["Answer"])),
        "metadata": {"Equation": row["Equation"].strip(), "Type": row["Type"], "ID": row["ID"]},
    }
