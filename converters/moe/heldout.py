"""Held-out routing accuracy: does each layer's router send a text's tokens to the expert the text is for?

A held-out file is JSONL, one object per line: {"expert": NAME or index, "text": "..."}; NAME is an expert's
`name:` in the recipe (``expert i`` when it has none). Scores are computed from each text's top-k expert ids per
layer and token ([L, T, k], best first), from any source: the base model's router inputs times the routers
(`route_states`; exact for a frankenMoE whose experts are copies of the base, since its router inputs are then
the base's) or a built MoE's own routing (`jaxmoe inspect --heldout`).

Primary score: token level. For each layer and each text's real tokens (the BOS every text starts with is the
same for all and is left out), the share whose top-1 (top-k) expert is the text's expert; averaged over the
texts' tokens per domain, then over layers, then over domains (each domain counts equally). Secondary: text
level, the share of texts whose most frequent top-1 expert over all layers and tokens is the intended one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from converters.moe.gates import tokenize_prompts

if TYPE_CHECKING:
    from converters.moe.gates import PromptEncoder


class HeldoutError(ValueError):
    """A held-out file that cannot be read as {expert, text} lines for the model's experts."""


@dataclass
class HeldoutScores:
    """top1 / topk [L, E]: token-level accuracy per layer and domain (NaN for a domain without texts);
    confusion [E, E]: share of domain r's tokens (all layers) whose top-1 expert is c; text [E]: text-level
    accuracy; tokens [E] and texts [E]: how many were scored; k: the k of topk."""

    top1: np.ndarray
    topk: np.ndarray
    confusion: np.ndarray
    text: np.ndarray
    tokens: np.ndarray
    texts: np.ndarray
    k: int

    @property
    def domain_top1(self) -> np.ndarray:
        """[E] top-1 accuracy per domain, averaged over layers."""
        return self.top1.mean(0)

    @property
    def mean_top1(self) -> float:
        """Top-1 accuracy averaged over layers and over the domains that have texts (the headline number)."""
        return float(np.nanmean(self.domain_top1))

    @property
    def mean_topk(self) -> float:
        """Top-k accuracy averaged over layers and domains."""
        return float(np.nanmean(self.topk.mean(0)))


def load_heldout(path: str | Path, names: Sequence[str]) -> list[tuple[int, str]]:
    """(expert index, text) per line of a held-out JSONL file; raises HeldoutError with file:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HeldoutError(f"{path}: cannot read the held-out file: {e}") from None
    index = {n: i for i, n in enumerate(names)}
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise HeldoutError(f"{path}:{no}: not JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise HeldoutError(f'{path}:{no}: expected {{"expert": NAME, "text": "non-empty text"}}')
        expert = item.get("expert")
        if isinstance(expert, int) and not isinstance(expert, bool) and 0 <= expert < len(names):
            out.append((expert, item["text"]))
        elif isinstance(expert, str) and expert in index:
            out.append((index[expert], item["text"]))
        else:
            raise HeldoutError(f"{path}:{no}: expert {expert!r} is not one of {', '.join(names)} "
                               f"(or an index below {len(names)})")
    if not out:
        raise HeldoutError(f"{path}: no held-out texts")
    return out


def route_states(states: np.ndarray, router: np.ndarray, k: int) -> np.ndarray:
    """Top-k expert ids [L, T, k], best first, of router inputs [L, T, H] under routers [L, E, H]
    (ties to the lower expert id, as top-k in transformers and in jaxmoe)."""
    z = np.einsum("lth,leh->lte", np.asarray(states, np.float32), np.asarray(router, np.float32))
    return np.argsort(-z, axis=-1, kind="stable")[..., :k]


def base_router_states(encoder: "PromptEncoder", tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Router inputs [L, T, H] of each text's real tokens (the BOS prefix left out) under the encoder's base
    model: every layer's normalised MLP input. Texts run sorted by length (fewer padded shapes to compile)."""
    seqs = tokenize_prompts(tokenizer, texts)
    skip = int(getattr(tokenizer, "bos_token_id", None) is not None)
    return [s[:, skip:] for s in encoder.token_states(seqs)]


def base_heldout_scores(encoder: "PromptEncoder", tokenizer: Any, router: np.ndarray, items: Sequence[tuple[int, str]],
                        k: int) -> HeldoutScores:
    """Scores of routers [L, E, H] on held-out (expert, text) items, routed with the base model's router
    inputs (exact for experts that are copies of the base)."""
    states = base_router_states(encoder, tokenizer, [t for _, t in items])
    return score_routing([route_states(s, router, k) for s in states], [e for e, _ in items], router.shape[1])


def score_routing(choices: Sequence[np.ndarray], labels: Sequence[int], num_experts: int) -> HeldoutScores:
    """Scores of texts whose real tokens were routed to choices[i] = top-k ids [L, T_i, k] (best first);
    labels[i] is text i's expert."""
    if not choices or len(choices) != len(labels):
        raise ValueError(f"{len(choices)} routed texts for {len(labels)} labels")
    L, k = choices[0].shape[0], choices[0].shape[2]
    hit1, hitk = np.zeros((L, num_experts)), np.zeros((L, num_experts))
    conf = np.zeros((num_experts, num_experts))
    tokens, texts, text_hit = np.zeros(num_experts), np.zeros(num_experts), np.zeros(num_experts)
    for c, e in zip(choices, labels):
        top = c[..., 0]
        hit1[:, e] += (top == e).sum(1)
        hitk[:, e] += (c == e).any(-1).sum(1)
        counts = np.bincount(top.ravel(), minlength=num_experts)
        conf[e] += counts
        tokens[e] += top.shape[1]
        texts[e] += 1
        text_hit[e] += counts.argmax() == e
    with np.errstate(invalid="ignore", divide="ignore"):
        return HeldoutScores(hit1 / tokens, hitk / tokens, conf / conf.sum(1, keepdims=True), text_hit / texts,
                             tokens, texts, k)


def format_scores(scores: HeldoutScores, names: Sequence[str], source: str = "") -> str:
    """Markdown: headline, per-domain table, confusion matrix, per-layer top-1 (one line)."""
    s = scores
    head = (f"Held-out routing accuracy{f' ({source})' if source else ''}: top-1 {s.mean_top1:.1%}, top-{s.k} "
            f"{s.mean_topk:.1%} (token level, averaged over {s.top1.shape[0]} layers and {int((s.texts > 0).sum())} "
            f"domains; {int(s.texts.sum())} texts, {int(s.tokens.sum())} tokens)\n\n")
    rows = "| domain | texts | tokens | top-1 | top-%d | text-level |\n|---|---|---|---|---|---|\n" % s.k
    for e, n in enumerate(names):
        if s.texts[e]:
            rows += (f"| {n} | {int(s.texts[e])} | {int(s.tokens[e])} | {s.domain_top1[e]:.1%} | "
                     f"{s.topk[:, e].mean():.1%} | {s.text[e]:.1%} |\n")
    conf = "\nConfusion (row: the text's expert; column: share of its tokens' top-1, all layers):\n\n" + \
        "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n" + \
        "".join(f"| {n} | " + " | ".join(f"{x:.0%}" for x in s.confusion[e]) + " |\n"
                for e, n in enumerate(names) if s.texts[e])
    layers = "\nTop-1 per layer: " + " ".join(f"{x:.2f}" for x in np.nanmean(s.top1, 1)) + "\n"
    return head + rows + conf + layers
