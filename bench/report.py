"""What test_performance.py concludes from its rows: the recommendation line and the chart. No ComfyUI.

Both read only measured rows: the recommendation quotes one row (never an extrapolation between
rows), and the chart plots the rows' own numbers, which `write_chart` returns as read back from the
figure so a test can compare them with the JSON.
"""

from __future__ import annotations

from collections.abc import Iterable

NO_GPU = "n/a (no GPU)"
# Contenders in the order the table, the chart legend and the recommendation name them.
CONTENDER_NAMES = {
    "resident": "no swap (resident)",
    "blockswap": "BlockSwap",
    "comfyui_lowvram": "ComfyUI lowvram",
    "blockswap_auto": "BlockSwap auto",
    "comfyui_dynamic_vram": "ComfyUI dynamic VRAM",
    "comfyui_gguf": "ComfyUI-GGUF",
}


def _ok(row: dict) -> bool:
    return not row.get("error") and isinstance(row.get("step_time_s"), (int, float))


def fits(row: dict, card_mb: float | None) -> bool | None:
    """Whether a measured row fits a card of `card_mb` (None: no VRAM to fit, a CPU run)."""
    if card_mb is None:
        return None
    peak = row.get("peak_vram_mb")
    if not _ok(row) or not isinstance(peak, (int, float)):
        return False
    return peak <= card_mb and not row.get("comfyui_partial_load")


def _percent(value) -> str:
    return f"{value:+.1f} %" if isinstance(value, (int, float)) else "n/a"


def recommendation(rows: Iterable[dict], card_gb: float | None, point: str | None = None) -> str:
    """One line: the smallest blocks_to_swap whose measured row fits the card at the largest video
    measured (or `point`), its measured cost, and ComfyUI's own offloading at the same blocks_to_swap."""
    rows = [r for r in rows if r.get("video")]
    if not rows:
        return "Recommendation: none (no rows measured)"
    if point is None:
        point = max(rows, key=lambda r: r.get("tokens") or 0)["video"]
    here = [r for r in rows if r["video"] == point]
    if card_gb is None:
        return (
            f"Recommendation: none at {point} - no GPU, so no VRAM to fit: this run cannot say which "
            "blocks_to_swap fits a card (run it on a GPU; --vram-limit GB simulates a smaller one)"
        )
    card_mb = card_gb * 1024
    resident = next((r for r in here if r["contender"] == "resident" and _ok(r)), None)
    if resident is not None and fits(resident, card_mb):
        return (
            f"For {card_gb:.1f} GB at {point}: blocks_to_swap=0 - the whole model fits "
            f"(measured peak {resident['peak_vram_mb']:,.0f} MB); swapping would only cost time"
        )
    candidates = [r for r in here if r["contender"] == "blockswap" and fits(r, card_mb)]
    if not candidates:
        tried = sorted({r["blocks_to_swap"] for r in here if r["contender"] == "blockswap"})
        return (
            f"For {card_gb:.1f} GB at {point}: none of the measured blocks_to_swap values {tried} fits "
            "(measure more with --test-all or larger --blocks-to-swap)"
        )
    smallest = min(r["blocks_to_swap"] for r in candidates)
    best = min((r for r in candidates if r["blocks_to_swap"] == smallest), key=lambda r: r["step_time_s"])
    native = [
        r
        for r in here
        if r["contender"] in ("comfyui_lowvram", "comfyui_gguf")
        and r["blocks_to_swap"] == smallest
        and _ok(r)
    ]
    dynamic = [r for r in here if r["contender"] == "comfyui_dynamic_vram" and _ok(r)]
    others = [
        f"{CONTENDER_NAMES[r['contender']]}: {_percent(r.get('time_difference_percent'))}" for r in native
    ]
    others += [f"ComfyUI dynamic VRAM: {_percent(r.get('time_difference_percent'))}" for r in dynamic]
    tail = f" ({'; '.join(others)})" if others else ""
    return (
        f"For {card_gb:.1f} GB at {point}: blocks_to_swap={smallest}, prefetch_blocks={best['prefetch_blocks']}, "
        f"use_non_blocking={best['non_blocking']} -> {_percent(best.get('time_difference_percent'))} step time "
        f"vs no swap{tail}"
    )


def auto_vs_best_fixed(rows: list[dict]) -> list[dict[str, object]]:
    """Per video: auto_blocks_to_swap's row against the fastest fixed blocks_to_swap row that ran."""
    out = []
    for auto in (r for r in rows if r["contender"] == "blockswap_auto"):
        if not _ok(auto):
            out.append({"video": auto["video"], "text": f"auto at {auto['video']}: failed ({auto['error']})"})
            continue
        fixed = [r for r in rows if r["contender"] == "blockswap" and r["video"] == auto["video"] and _ok(r)]
        if not fixed:
            continue
        best = min(fixed, key=lambda r: r["step_time_s"])
        ratio = auto["step_time_s"] / best["step_time_s"] - 1
        out.append(
            {
                "video": auto["video"],
                "auto_blocks_to_swap": auto["blocks_to_swap"],
                "best_fixed_blocks_to_swap": best["blocks_to_swap"],
                "step_time_difference_percent": round(100 * ratio, 2),
                "text": (
                    f"auto at {auto['video']}: {auto['blocks_to_swap']} blocks swapped, step {auto['step_time_s']:.3f} s; "
                    f"fastest fixed: blocks_to_swap={best['blocks_to_swap']} at {best['step_time_s']:.3f} s "
                    f"({100 * ratio:+.1f} %)"
                ),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
# Chart
# ----------------------------------------------------------------------------------------------


def _label(row: dict, prefetches: set) -> str:
    name = CONTENDER_NAMES.get(row["contender"], row["contender"])
    if row["contender"] == "blockswap" and len(prefetches) > 1:
        name += f" prefetch {row['prefetch_blocks']}"
    return name


def chart_series(rows: Iterable[dict]) -> dict[str, dict[str, dict[str, list]]]:
    """{video: {contender label: {"x": blocks_to_swap, "step_time_s": [...], "peak_vram_mb": [...]}}}
    from the measured rows (failed rows left out). Rows without a blocks_to_swap (dynamic VRAM sizes
    itself) become a flat line across the measured blocks_to_swap range."""
    rows = [r for r in rows if _ok(r)]
    prefetches = {r["prefetch_blocks"] for r in rows if r["contender"] == "blockswap"}
    series: dict[str, dict[str, dict[str, list]]] = {}
    for video in dict.fromkeys(r["video"] for r in rows):
        here = [r for r in rows if r["video"] == video]
        counts = sorted({r["blocks_to_swap"] for r in here if r["blocks_to_swap"] is not None})
        lines: dict[str, dict[str, list]] = {}
        for row in here:
            line = lines.setdefault(_label(row, prefetches), {"x": [], "step_time_s": [], "peak_vram_mb": []})
            xs = [row["blocks_to_swap"]] if row["blocks_to_swap"] is not None else [counts[0], counts[-1]]
            for x in xs:
                line["x"].append(x)
                line["step_time_s"].append(row["step_time_s"])
                peak = row.get("peak_vram_mb")
                line["peak_vram_mb"].append(peak if isinstance(peak, (int, float)) else None)
        for line in lines.values():
            order = sorted(range(len(line["x"])), key=line["x"].__getitem__)
            for key in line:
                line[key] = [line[key][i] for i in order]
        series[video] = lines
    return series


def matplotlib_missing() -> str | None:
    """Why --chart cannot work here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "--chart needs matplotlib, which is not installed: pip install matplotlib "
            "(an optional dependency, listed in requirements-dev.txt)"
        )
    return None


def write_chart(rows: list[dict], path: str, title: str) -> dict[str, dict[str, dict[str, list]]]:
    """Step time and peak VRAM vs blocks_to_swap, one line per contender, one row of panels per video;
    saved as PNG. Returns what the figure plots, read back from its lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = chart_series(rows)
    videos = list(series) or ["(no rows)"]
    fig = Figure(figsize=(11, 3.6 * len(videos)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(videos), 2, squeeze=False)
    plotted: dict[str, dict[str, dict[str, list]]] = {}
    for (ax_time, ax_vram), video in zip(axes, videos, strict=True):
        lines = series.get(video, {})
        out = plotted.setdefault(video, {})
        for label, line in lines.items():
            style = "--" if len(set(line["x"])) == 2 and len(set(line["step_time_s"])) == 1 else "-"
            (drawn,) = ax_time.plot(line["x"], line["step_time_s"], style, marker="o", label=label)
            out.setdefault(label, {})["x"] = [float(v) for v in drawn.get_xdata()]
            out[label]["step_time_s"] = [float(v) for v in drawn.get_ydata()]
            if all(v is not None for v in line["peak_vram_mb"]):
                (drawn,) = ax_vram.plot(line["x"], line["peak_vram_mb"], style, marker="o", label=label)
                out[label]["peak_vram_mb"] = [float(v) for v in drawn.get_ydata()]
        ax_time.set(title=f"{video}: step time", xlabel="blocks_to_swap", ylabel="seconds per step")
        ax_vram.set(title=f"{video}: peak VRAM", xlabel="blocks_to_swap", ylabel="MB")
        if not ax_vram.lines:
            ax_vram.text(0.5, 0.5, NO_GPU, ha="center", va="center", transform=ax_vram.transAxes)
        for ax in (ax_time, ax_vram):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png", dpi=90)
    return plotted
