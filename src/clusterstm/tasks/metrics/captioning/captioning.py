"""Video captioning metrics through pycocoevalcap: BLEU-1..4, ROUGE-L, CIDEr (and METEOR with Java).

A self-contained `evaluate` metric module (loads offline with `evaluate.load("<path to this folder>")`).

Tokenisation: the reference protocol (COCO caption evaluation) tokenises with the Stanford PTB tokenizer, which needs
Java. With `tokenizer="auto"` the PTB tokenizer is used when a `java` executable is on PATH, otherwise a pure-python
approximation (lower case, PTB-style contraction splitting, punctuation removed). The output says which one was
used under the `tokenizer` key (`"ptb"` or `"python"`), because scores differ slightly between the two.
METEOR also needs Java; SPICE is not computed (it needs a model download). Scores are raw fractions as returned by
pycocoevalcap (BLEU-4 of an exact match is 1.0); papers usually multiply them by 100.
CIDEr here is pycocoevalcap's CIDEr-D, whose document frequencies come from the evaluated references: it needs
several videos to be meaningful (with a single video every n-gram has idf 0 and CIDEr is 0).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence

import datasets
import evaluate

_DESCRIPTION = "Captioning metrics (BLEU-1..4, ROUGE-L, CIDEr-D, optional METEOR) computed with pycocoevalcap."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one generated caption per video.
    references (`list[list[str]]`): the reference captions of every video (one or more).
    tokenizer (`str`, defaults to `"auto"`): `"auto"`, `"ptb"` (needs Java) or `"python"`.
    meteor (`bool` or `"auto"`, defaults to `"auto"`): compute METEOR (needs Java; `"auto"` = when Java is found).
Returns:
    `bleu_1`..`bleu_4`, `rouge_l`, `cider`, optionally `meteor`, `num_samples`, and `tokenizer` (`"ptb"`/`"python"`).
Examples:
    >>> metric = evaluate.load("src/clusterstm/tasks/metrics/captioning")
    >>> metric.compute(predictions=["a dog runs"], references=[["a dog runs"]], tokenizer="python")["bleu_4"]
"""

# Tokens the COCO evaluation wrapper drops after PTB tokenisation.
_PUNCTUATIONS = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}
# Every character `str.splitlines()` breaks on (\n, \r, \v, \f, \x1c-\x1e, \x85, \u2028, \u2029): the PTB tokenizer
# reads one caption per line, so any of these inside a caption would shift every later caption onto the wrong
# reference.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_CONTRACTION_NT = re.compile(r"(\w)n't\b")
_CONTRACTION_OTHER = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_TOKEN = re.compile(r"n't|'\w+|\w+|[^\w\s]")
_WORD = re.compile(r"\w")


def java_available() -> bool:
    """Whether a `java` executable is on PATH (needed by the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def normalize_caption(caption: str) -> str:
    """One line of text: every line-break character (all of `str.splitlines()`'s classes) becomes a space."""
    if not isinstance(caption, str):
        raise ValueError(f"captions must be strings, got {type(caption).__name__} {caption!r:.60}")
    return _LINE_BREAKS.sub(" ", caption)


def python_tokenize(caption: str) -> str:
    """Pure-python approximation of the COCO PTB tokenisation: lower case, split contractions, drop punctuation."""
    text = normalize_caption(caption).lower()
    text = _CONTRACTION_NT.sub(r"\1 n't", text)
    text = _CONTRACTION_OTHER.sub(r"\1 '\2", text)
    tokens = [tok for tok in _TOKEN.findall(text) if tok not in _PUNCTUATIONS and (_WORD.search(tok) or len(tok) > 1)]
    return " ".join(tokens)


def _ptb_tokenize(sentences: list[str]) -> list[str]:
    # Same command as pycocoevalcap's PTBTokenizer, but the temporary file goes to the system temp dir (the package
    # folder may be read-only) and the line count is checked.
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(
        os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    )
    lines_in = [normalize_caption(s) for s in sentences]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8", newline="\n") as handle:
        handle.write("\n".join(lines_in))
        path = handle.name
    try:
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        result = subprocess.run(cmd, capture_output=True, check=True, timeout=600)
    finally:
        os.remove(path)
    lines = result.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "" and len(lines) == len(sentences) + 1:
        lines.pop()  # the final newline
    # Both ways: a missing line or an extra one means captions and references no longer line up.
    if len(lines) != len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCTUATIONS) for line in lines]


def caption_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str] | str],
    tokenizer: str = "auto",
    meteor: bool | str = "auto",
) -> dict[str, float | str]:
    """BLEU-1..4, ROUGE-L and CIDEr-D (pycocoevalcap), plus METEOR when requested and Java is present.

    Args:
        predictions: one generated caption per video.
        references: the reference captions of each video (a single string is one reference).
        tokenizer: `"auto"` (PTB when Java is on PATH, else python), `"ptb"` or `"python"`.
        meteor: `True`, `False` or `"auto"` (when Java is on PATH).

    Returns:
        Metric dict with float scores, `num_samples` and the `tokenizer` actually used.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predictions = [normalize_caption(p) for p in predictions]
    references = [
        [normalize_caption(r)] if isinstance(r, str) else [normalize_caption(x) for x in r] for r in references
    ]
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("caption_metrics needs at least one prediction")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference caption")
    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")
    if meteor not in (True, False, "auto"):
        raise ValueError(f"meteor must be True, False or 'auto', got {meteor!r}")
    has_java = java_available()
    if tokenizer == "ptb" and not has_java:
        raise ValueError("tokenizer='ptb' needs a `java` executable on PATH; use tokenizer='python'")
    if meteor is True and not has_java:
        raise ValueError("meteor=True needs a `java` executable on PATH")

    used = "ptb" if tokenizer == "ptb" or (tokenizer == "auto" and has_java) else "python"
    flat = list(predictions) + [r for refs in references for r in refs]
    if used == "ptb":
        try:
            tokenized = _ptb_tokenize(flat)
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            if tokenizer == "ptb":
                raise
            warnings.warn(f"PTB tokenizer failed ({err}); falling back to the python tokenizer", stacklevel=2)
            used, tokenized = "python", [python_tokenize(s) for s in flat]
    else:
        tokenized = [python_tokenize(s) for s in flat]

    res, gts, pos = {}, {}, len(predictions)
    for i, refs in enumerate(references):
        res[i] = [tokenized[i]]
        gts[i] = tokenized[pos : pos + len(refs)]
        pos += len(refs)

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, float | str] = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["rouge_l"] = float(rouge)
    out["cider"] = float(cider)
    if meteor is True or (meteor == "auto" and has_java):
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    out["num_samples"] = len(predictions)
    out["tokenizer"] = used
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Captioning(evaluate.Metric):
    """`evaluate` wrapper of `caption_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references, tokenizer: str = "auto", meteor: bool | str = "auto"):
        return caption_metrics(predictions, references, tokenizer=tokenizer, meteor=meteor)
