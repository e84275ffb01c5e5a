"""The study's figures, one renderer each (matplotlib): the PNG, and an HTML page that embeds it beside the numbers
it draws (no script: the page is the figure and its table). The lead figure is the README's: the held-out trait
against coherence, raw steering's dose curve as a line with its band, the declared arms labelled, controls hollow."""
from __future__ import annotations

import base64
import html as H
import math
from pathlib import Path

import numpy as np

from steer_heal.report import html_page
from steer_heal.rundir import write_atomic
from steer_heal.study.analysis import Study

# matplotlib's tab10: an arm keeps one colour across a study's figures
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
KIND_COLOUR = {"base": "k", "prompt": "tab:red", "steer": "tab:orange", "iterative": "tab:blue", "online": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _iv(iv) -> str:
    return "-" if iv is None else f"{iv.value:+.3f} [{iv.lo:+.3f}, {iv.hi:+.3f}]"


def figure_page(d: Path, name: str, title: str, caption: str, head: list[str], rows: list[list[str]]) -> None:
    """<name>.html: the PNG embedded, its caption, and the table of what it draws."""
    img = base64.b64encode((d / f"{name}.png").read_bytes()).decode()
    table = ("<table><tr>" + "".join(f"<th>{H.escape(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{H.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
             + "</table>")
    write_atomic(d / f"{name}.html", html_page(name, f"<h2>{H.escape(title)}</h2><p>{H.escape(caption)}</p>"
                                                     f"<img src='data:image/png;base64,{img}'>{table}"))


# ------------------------------------------------------------ dose sweep
def dose_sweep_figure(s: Study, d: Path) -> None:
    arms = s.sweep_arms()
    if not arms:
        return
    xs = [a.target_kl for a in arms]
    panels = [("trait_nats", "d MFV trait_nats"), ("trait_nats_answering", "d MFV trait (answering)"),
              ("trait_llr_heldout", "d held-out trait_llr"), (s.coh, f"d {s.coh} (nats)")]
    data = {m: [s.diff(a.name, "base", m) for a in arms] for m, _ in panels}
    plt = _plt()
    fig, axs = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (m, title) in zip(axs, panels):
        v = [(x, iv.value, iv.lo, iv.hi) for x, iv in zip(xs, data[m]) if iv is not None]
        if v:
            x, y, lo, hi = map(np.array, zip(*v))
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", capsize=3)
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{t:g}" for t in x])  # the targets themselves, no log minor labels
            ax.minorticks_off()
        ax.axhline(0, color="0.7", lw=1)
        ax.set_xlabel("iso-KL target (p95 nats)")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{s.model.split('/')[-1]}, {s.preset}: raw steering vs base", fontsize=10)
    fig.tight_layout()
    fig.savefig(d / "dose_sweep.png", dpi=120)
    plt.close(fig)
    rows = [[a.name, f"{a.target_kl:g}"] + [_iv(data[m][i]) for m, _ in panels] for i, a in enumerate(arms)]
    figure_page(d, "dose_sweep", "Raw steering: change vs base per iso-KL target", "95% intervals over items.",
                ["arm", "target_kl"] + [t for _, t in panels], rows)


# ------------------------------------------------------------ drift
DRIFT_PANELS = ["incoherence", "coherent", "repetition", "trait_heldout", "barrier_active_frac", "D_mean", "D_rmse",
                "tail_nll"]
LO_OK = {m: 0.0 for m in ("incoherence", "coherent", "repetition", "barrier_active_frac", "D_mean", "D_rmse",
                          "tail_nll")}
HI_OK = {"coherent": 1.0, "repetition": 1.0, "barrier_active_frac": 1.0}


def drift_look(arms) -> dict[str, dict]:
    """One colour and dash per arm: a placebo takes its arm's colour, dotted; online arms are dashed; so a dozen
    arms stay readable."""
    roots = list(dict.fromkeys(a.placebo_of or a.name for a in arms))
    return {a.name: dict(colour=TAB10[roots.index(a.placebo_of or a.name) % len(TAB10)],
                         dash=[2, 3] if a.control == "placebo" else [6, 4] if a.kind == "online" else [])
            for a in arms}


def drift_data(s: Study, arms) -> dict:
    """Per arm and panel: (generated tokens, mean, lo, hi) per round / bake. x is generated tokens (mean over
    seeds) so drivers of different step sizes share one axis; a t band over 2-3 seeds is wide (t = 12.7 at 2),
    so bands are cut at what the measure can take."""
    tokens = {a.name: {k: iv.value for k, iv in s.drift_series(a.name, "gen_tokens")} for a in arms}
    return {a.name: {m: [(tokens[a.name].get(k, float(k)), iv.value, max(iv.lo, LO_OK.get(m, -math.inf)),
                          min(iv.hi, HI_OK.get(m, math.inf))) for k, iv in s.drift_series(a.name, m)]
                     for m in DRIFT_PANELS} for a in arms}


def _drift_axis(ax, m: str, means: list[float]) -> None:
    if m.startswith("D_") and means and min(means) > 0:  # drift spans decades between arms
        ax.set_yscale("log")
        ax.set_ylim(min(means) / 2, max(means) * 2)
    elif means:  # the axis follows the means; a band wider than that is cut at the frame
        pad = 0.25 * ((max(means) - min(means)) or abs(max(means)) or 1.0)
        ax.set_ylim(max(min(means) - pad, LO_OK.get(m, -math.inf) - 0.02 * pad),
                    min(max(means) + pad, HI_OK.get(m, math.inf) + 0.02 * pad))
    ax.set_title(m + (" (log)" if ax.get_yscale() == "log" else ""), fontsize=10)
    ax.set_xlabel("generated tokens (round / bake)")


def drift_figure(s: Study, d: Path) -> None:
    arms = s.drift_arms()
    if not arms:
        return
    data, look = drift_data(s, arms), drift_look(arms)
    plt = _plt()
    fig, axs = plt.subplots(2, 4, figsize=(17, 7.5))
    for ax, m in zip(axs.flat, DRIFT_PANELS):
        means = []
        for a in arms:
            if not data[a.name][m]:
                continue
            k, y, lo, hi = map(np.array, zip(*data[a.name][m]))
            colour, dash = look[a.name]["colour"], look[a.name]["dash"]
            ax.plot(k, y, marker="o", ms=3, color=colour, label=a.name, linestyle=(0, dash) if dash else "-")
            ax.fill_between(k, lo, hi, color=colour, alpha=0.12)
            means += [v for v in y if math.isfinite(v)]
        _drift_axis(ax, m, means)
    handles = {lab: h for ax in axs.flat for h, lab in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 8), fontsize=8)
    fig.suptitle(f"{s.model.split('/')[-1]}, {s.preset}: drift per round / bake against generated tokens "
                 "(bands: 95% t-interval over seeds, cut at the frame)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(d / "drift.png", dpi=110)
    plt.close(fig)
    rows = [[a.name, m, f"{p[0]:.0f}", f"{p[1]:.3f} [{p[2]:.3f}, {p[3]:.3f}]"]
            for a in arms for m in DRIFT_PANELS for p in data[a.name][m]]
    figure_page(d, "drift", "Drift over generated tokens, a point per round / bake",
                "Lines: mean over seeds; bands: 95% t-interval; a placebo dotted in its arm's colour, online dashed.",
                ["arm", "measure", "generated tokens", "mean [95%]"], rows)


# ------------------------------------------------------------ frontier (every arm) and the lead figure
def _errorbar(ax, x, y, colour, hollow: bool) -> None:
    ok = all(math.isfinite(v) for v in (x.lo, x.hi, y.lo, y.hi))
    err = dict(xerr=[[x.value - x.lo], [x.hi - x.value]], yerr=[[y.value - y.lo], [y.hi - y.value]]) if ok else {}
    ax.errorbar([x.value], [y.value], fmt="o", color=colour, capsize=2, lw=0.8, ms=5,
                mfc="white" if hollow else colour, **err)


def frontier(s: Study, d: Path) -> None:
    """x: coherence lost (vs base), y: trait gained (MFV trait_nats vs base), a point per arm with its 95%
    intervals on both axes."""
    pts = [(a, dx, dy) for a in s.arms if (dx := s.diff(a.name, "base", s.coh)) is not None
           and (dy := s.diff(a.name, "base", "trait_nats")) is not None]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 6))
    ax.axhline(0, color="0.8", lw=1)
    ax.axvline(0, color="0.8", lw=1)
    for a, dx, dy in pts:
        _errorbar(ax, dx, dy, "0.55" if a.control else KIND_COLOUR.get(a.kind, "0.4"), bool(a.control))
        ax.annotate(a.name, (dx.value, dy.value), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"coherence lost: {s.coh} vs base (nats, held-out greedy answers)")
    ax.set_ylabel("trait gained: MFV trait_nats vs base")
    ax.set_title("steer-heal compare (bars: 95% intervals over seeds and items; hollow: controls)", fontsize=10)
    fig.tight_layout()
    fig.savefig(d / "frontier.png", dpi=120)
    plt.close(fig)
    figure_page(d, "frontier", "Trait gained vs coherence lost (a point per arm, bars: 95% intervals)",
                f"x: {s.coh} vs base (nats, lower is better); y: MFV trait_nats vs base.",
                ["arm", "kind", f"d_{s.coh}", "d_trait_nats"],
                [[a.name, a.kind, _iv(dx), _iv(dy)] for a, dx, dy in pts])


def _spread_labels(ys: list[float], lo: float, hi: float, gap: float) -> list[float]:
    """Label heights inside [lo, hi], no closer than `gap` (less where that many do not fit), each as near its
    point as that allows (the labels sit in one column)."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    gap = min(gap, (hi - lo) / max(len(ys), 1))
    out = [0.0] * len(ys)
    prev = lo - gap
    for i in order:  # up from the bottom, then back down from the top
        prev = out[i] = max(min(max(ys[i], lo), hi), prev + gap)
    nxt = hi + gap
    for i in reversed(order):
        nxt = out[i] = min(out[i], nxt - gap)
    return out


def lead_figure(s: Study, d: Path, trait: str = "trait_llr_heldout") -> bool:
    """lead.png: the held-out trait against coherence. Raw steering's dose curve (base + sweep) as a line with each
    dose's 95% bar, the arms named in the declared questions as points with 95% bars on both axes and labels in
    a column that do not overlap, controls (placebos, the persona prompt) hollow. False (nothing drawn) without
    a curve or such arms."""
    named = list(dict.fromkeys(x for q in s.primary for x in q[:2]))
    arms = [a for a in s.arms if a.name in named and a.kind not in ("base", "steer")]
    curve = s.curve()
    if len(curve) < 2 or not arms or any(s.interval(a.name, m) is None for a in curve + arms for m in (s.coh, trait)):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 5.6))
    cx = [s.interval(a.name, s.coh) for a in curve]
    cy = [s.interval(a.name, trait) for a in curve]
    ax.errorbar([x.value for x in cx], [y.value for y in cy], yerr=[[y.value - y.lo for y in cy],
                [y.hi - y.value for y in cy]], fmt="s-", color="tab:orange", ms=4, lw=1.5, capsize=2,
                label="raw steering (dose curve)")
    for a, x, y in zip(curve, cx, cy):
        ax.annotate("base" if a.kind == "base" else f"{a.target_kl:g} nats", (x.value, y.value), fontsize=7,
                    color="tab:orange", xytext=(4, -10), textcoords="offset points")
    pts = [(a, s.interval(a.name, s.coh), s.interval(a.name, trait)) for a in arms]
    for a, x, y in pts:
        hollow = bool(a.control) or a.kind == "prompt"
        _errorbar(ax, x, y, "0.5" if hollow else KIND_COLOUR.get(a.kind, "0.4"), hollow)
    lo, hi = ax.get_ylim()
    x0, x1 = ax.get_xlim()
    x_lab = x1 + 0.04 * (x1 - x0)
    ax.set_xlim(x0, x_lab + 0.45 * (x1 - x0))  # room for the label column
    pad = 0.03 * (hi - lo)
    for (a, x, y), yl in zip(pts, _spread_labels([y.value for _, _, y in pts], lo + pad, hi - pad, 0.05 * (hi - lo))):
        ax.annotate(a.name, (x.value, y.value), xytext=(x_lab, yl), fontsize=7.5, va="center",
                    arrowprops=dict(arrowstyle="-", color="0.8", lw=0.6))
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"incoherence ({s.coh}, nats; lower is more coherent)")
    ax.set_ylabel("held-out trait (trait_llr, held-out persona)")
    ax.set_title(f"{s.name}: the declared arms against raw steering (95% bars; hollow: controls)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "lead.png", dpi=120)
    plt.close(fig)
    return True


def answers_page(d: Path, rows: list[dict], n: int = 6) -> None:
    seen, cols = set(), []
    for r in rows:
        if r["arm"] not in seen:
            seen.add(r["arm"])
            cols.append(r)
    prompts = next((r.get("prompts") for r in rows if r.get("prompts")), None) or []
    body = []
    for i in range(min(n, len(cols[0]["texts"]) if cols else 0)):
        body.append(f"<h3>{H.escape(prompts[i]) if i < len(prompts) else i}</h3><table border=1 cellpadding=4>")
        body += [f"<tr><td><b>{H.escape(r['arm'])}</b></td><td>{H.escape(r['texts'][i])}</td></tr>" for r in cols]
        body.append("</table>")
    write_atomic(d / "answers.html", html_page("answers", "<h2>Every arm's greedy answers to the same held-out "
                                                          "prompts (first seed)</h2>" + "".join(body)))
