"""Plain report text as LaTeX, for the generated tables and the figure captions alike."""

from __future__ import annotations

import re


def latex_text(text: str) -> str:
    """Escape LaTeX's specials, typeset 'x' after a number or before 'dense' as a times sign, '->' as an arrow
    and the word 'tau' as the symbol."""
    for plain, tex in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                       ("->", r"$\rightarrow$"), ("±", r"$\pm$")):
        text = text.replace(plain, tex)
    text = re.sub(r"\btau\b", r"$\\tau$", text)
    text = re.sub(r"(?<=[0-9])x\b", r"$\\times$", text)
    return re.sub(r"\bx dense\b", r"$\\times$ dense", text)
