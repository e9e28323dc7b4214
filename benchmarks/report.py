"""Regenerate benchmarks/quality.md, benchmarks/quality_auc_vs_n.png and benchmarks/quality_hybrid.png from
benchmarks/results/quality.json.

    .venv/bin/pip install -e '.[bench]'    # once: matplotlib (and locust)
    .venv/bin/python benchmarks/report.py

Every figure comes from quality.json, where each entry carries the command that produced it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quality.json"
SPLITS = HERE / "results" / "splits.json"
ANCHORS_ML1M = [("zero-shot Vicuna-13B", 0.6993), ("ReLLa (<10% data, Vicuna-13B)", 0.8033),
                ("SIM (full data)", 0.7992), ("DIN (full data)", 0.7962)]


def _n_of(method: str) -> int | None:
    match = re.search(r"-n(\d+)", method)
    return int(match.group(1)) if match else None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _seconds(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def table(methods: dict) -> list[str]:
    columns = ["method", "kind", "AUC", "LogLoss", "ACC", "n_test", "n_train", "epochs", "train s",
               "offline agreement", "command"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, r in sorted(methods.items(), key=lambda kv: (kv[1].get("kind", ""), _n_of(kv[0]) or 0, kv[0])):
        offline = r.get("offline") or {}
        agree = f"mean abs dp {offline['mean_abs_delta_p']:.1e}" if offline else "-"
        lines.append(f"| {name} | {r.get('kind')} | {_fmt(r.get('auc'))} | {_fmt(r.get('logloss'))} | "
                     f"{_fmt(r.get('acc'))} | {r.get('n_test')} | {r.get('n_train', '-')} | {r.get('epochs', '-')} | "
                     f"{_seconds(r.get('train_seconds'))} | {agree} | `{r.get('command', '')}` |")
    return lines


SLICES = {"all": "all samples", "cold_items": "cold items (< 10 earlier ratings)",
          "cold_users": "cold users (< 20 earlier ratings)"}


def methods_of(entries: dict) -> dict:
    """The method rows of a dataset (its entries besides served_default and served_vs_best_crm)."""
    return {name: row for name, row in entries.items() if isinstance(row, dict) and "auc" in row}


def _ci(gain: dict | None) -> str:
    if not gain:
        return "-"
    lo, hi = gain["ci95"]
    return f"{gain['delta_auc']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def served_section(entries: dict) -> list[str]:
    """The served default against each component, on every slice, from one gateway pass."""
    method = entries.get("served_default")
    if not method or method not in entries:
        return []
    served, gain = entries[method], entries.get("served_vs_best_crm") or {}
    lines = [f"**Served default: `{method}`** (scorer {served.get('kind')}): test AUC {served['auc']:.4f} on "
             f"{served['n_test']:,} samples; against the best CRM (`{gain.get('crm')}`, same samples): "
             f"{_ci(gain)} (paired bootstrap, 95%).", "",
             "| slice | n | CRM AUC | LLM AUC | served AUC | served - CRM [95% CI] |", "|---|---|---|---|---|---|"]
    for key, label in SLICES.items():
        parts = {part: (entries.get(f"{method}-{part}", {}).get("slices") or {}).get(key, {})
                 for part in ("crm", "llm")}
        mine = (served.get("slices") or {}).get(key, {})
        lines.append(f"| {label} | {mine.get('n', '-')} | {_fmt(parts['crm'].get('auc'))} | "
                     f"{_fmt(parts['llm'].get('auc'))} | {_fmt((mine.get('served') or {}).get('auc'))} | "
                     f"{_ci(mine.get('served_vs_crm'))} |")
    return lines + [""]


def crm_section(methods: dict) -> list[str]:
    """The conventional recommenders side by side: validation (what chose the CRM) and test."""
    rows = {name: r for name, r in methods.items()
            if r.get("kind") == "crm" and (r.get("valid") or r.get("validation"))}
    if not rows:
        return []
    lines = ["CRMs (the best on validation is the served CRM):", "",
             "| CRM | validation AUC | test AUC | n_test |", "|---|---|---|---|"]
    for name, r in sorted(rows.items(), key=lambda kv: -(kv[1].get("valid") or kv[1].get("validation"))["auc"]):
        valid = (r.get("valid") or r.get("validation"))["auc"]
        lines.append(f"| {name} | {valid:.4f} | {r['auc']:.4f} | {r['n_test']} |")
    return lines + [""]


def _pyplot():
    try:
        import matplotlib
    except ImportError:  # a report without its plot would drop the committed figure: refuse instead
        raise SystemExit("benchmarks/report.py needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_hybrid(results: dict, path: Path) -> bool:
    """Per dataset and slice: the CRM's, the LLM's and the served AUC, side by side."""
    plt = _pyplot()
    bars = []
    for dataset, entries in sorted(results.items()):
        method = entries.get("served_default")
        if not method or method not in entries:
            continue
        for key in SLICES:
            values = [((entries.get(f"{method}-{part}", {}).get("slices") or {}).get(key) or {}).get("auc")
                      for part in ("crm", "llm")]
            served = (((entries[method].get("slices") or {}).get(key) or {}).get("served") or {}).get("auc")
            bars.append((f"{dataset}\n{key.replace('_', ' ')}", *values, served))
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars)), 4))
    for j, (label, color) in enumerate((("CRM", "C0"), ("LLM", "C1"), ("served (hybrid)", "C2"))):
        xs = [i + (j - 1) * 0.27 for i in range(len(bars))]
        ax.bar(xs, [b[j + 1] or 0 for b in bars], width=0.27, label=label, color=color)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylim(0.45, max(b[k] or 0 for b in bars for k in (1, 2, 3)) + 0.03)
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot(results: dict, path: Path) -> bool:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4))
    drawn = False
    for i, (dataset, entries) in enumerate(sorted(results.items())):
        methods = methods_of(entries)
        color = f"C{i}"  # one colour per dataset: its curve, its RecLoRA point, its baselines
        points = sorted((_n_of(m), r["auc"], r.get("epochs"), r.get("n_test")) for m, r in methods.items()
                        if re.fullmatch(r"reit-n\d+", m))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color,
                    label=f"{dataset} ReiT LoRA")
            mixed_sizes = len({p[3] for p in points}) > 1  # a curve mixing test sizes says which is which
            for n, auc, epochs, n_test in points:
                # epochs of training behind the checkpoint validation chose: the recipes differ
                notes = [f"{epochs:g} ep"] if epochs is not None else []
                notes += [f"{n_test:,} test"] if mixed_sizes else []
                if notes:
                    ax.annotate(", ".join(notes), (n, auc), textcoords="offset points", xytext=(4, -10),
                                fontsize=7, color=color)
            drawn = True
        personal = methods.get("reclora-personal")
        if personal and personal.get("n_train"):
            ax.plot([personal["n_train"]], [personal["auc"]], marker="*", markersize=10, linestyle="none",
                    color=color, label=f"{dataset} RecLoRA personal ({personal.get('n_test', 0):,} test)")
        for baseline, style in (("zero-shot", ":"), ("crm-din", "--")):
            if baseline in methods:
                ax.axhline(methods[baseline]["auc"], linestyle=style, color=color, label=f"{dataset} {baseline}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training samples N")
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    splits = json.loads(SPLITS.read_text()) if SPLITS.exists() else {}
    out = ["# Recommendation quality", "",
           "Generated by `.venv/bin/python benchmarks/report.py` from `benchmarks/results/quality.json`;",
           "each row's command produced it. ReLLa protocol: label = rating > 3, history = ratings strictly",
           "before the sample, samples with < 5 earlier ratings dropped, 8:1:1 split by global time.", ""]
    for dataset, entries in sorted(results.items()):
        methods = methods_of(entries)
        out += [f"## {dataset}", ""]
        if dataset in splits:
            s = splits[dataset]
            out += [f"Split sizes: train {s['train']:,}, valid {s['valid']:,}, test {s['test']:,} "
                    f"(from {s['ratings']:,} ratings).", ""]
        out += served_section(entries) + crm_section(methods) + table(methods) + [""]
    out += ["## Published ML-1M anchors (full ML-1M, for reference only)", "",
            "| method | AUC |", "|---|---|"] + [f"| {n} | {a} |" for n, a in ANCHORS_ML1M] + [""]
    if plot_hybrid(results, HERE / "quality_hybrid.png"):
        out += ["![served score against its components](quality_hybrid.png)", ""]
    if plot(results, HERE / "quality_auc_vs_n.png"):
        out += ["![AUC against N](quality_auc_vs_n.png)", ""]
    notes = HERE / "quality_notes.md"
    if notes.exists():
        out += [notes.read_text()]
    (HERE / "quality.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
