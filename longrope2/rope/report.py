"""What ``longrope2 inspect`` shows: per-pair periods, critical dims, each family's factors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longrope2.rope.factors import NATIVE_ATTENTION_FACTOR, family_factors
from longrope2.rope.frequencies import periods, ten_period_dim, theoretical_critical_dim
from longrope2.rope.scaling import RopeGeometry


@dataclass(frozen=True)
class RopeReport:
    name: str
    geometry: RopeGeometry
    target_length: int

    @property
    def scale(self) -> float:
        return self.target_length / self.geometry.original_max_position_embeddings

    @property
    def critical_dims(self) -> dict[str, int]:
        g = self.geometry
        return {
            "theoretical_critical_dim": theoretical_critical_dim(g.rotary_dim, g.rope_theta, g.original_max_position_embeddings),
            "ten_period_dim": ten_period_dim(g.rotary_dim, g.rope_theta, g.original_max_position_embeddings),
        }

    def family_factors(self) -> dict[str, list[float]]:
        """Each family's factors; LongRoPE2 shown at its search's theoretical seed
        (critical dim d_tcd, flat s above it), the shape the search starts from."""
        g, target = self.geometry, self.target_length
        args = (g.rotary_dim, g.rope_theta, g.original_max_position_embeddings, target)
        out = {name: family_factors(name, *args).tolist() for name in ("pi", "ntk", "yarn")}
        tcd = self.critical_dims["theoretical_critical_dim"]
        half = g.rotary_dim // 2
        if 0 < tcd < half and self.scale > 1:
            out["longrope2"] = family_factors(
                "longrope2", *args, critical_dim=tcd, upper_factors=[self.scale] * (half - tcd)
            ).tolist()
        return out

    def to_dict(self) -> dict[str, Any]:
        g = self.geometry
        p = periods(g.rotary_dim, g.rope_theta)
        window = g.original_max_position_embeddings
        return {
            "model": self.name,
            "head_dim": g.head_dim,
            "rotary_dim": g.rotary_dim,
            "rope_theta": g.rope_theta,
            "original_length": window,
            "target_length": self.target_length,
            "scale": self.scale,
            **self.critical_dims,
            "under_trained_pairs": [i for i, period in enumerate(p.tolist()) if period > window],
            "pairs": [
                {"pair": i, "period": period, "periods_in_window": window / period, "under_trained": period > window}
                for i, period in enumerate(p.tolist())
            ],
            "factors": self.family_factors(),
            "attention_factor": {
                name: NATIVE_ATTENTION_FACTOR[name](window, self.target_length) for name in NATIVE_ATTENTION_FACTOR
                if name != "base"
            },
        }

    def print_table(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        data = self.to_dict()
        factors = data["factors"]
        dims = self.critical_dims
        table = Table(title=f"{self.name}: RoPE pairs, window {data['original_length']} -> {self.target_length} "
                            f"(s = {self.scale:g})")
        table.add_column("pair", justify="right")
        table.add_column("period", justify="right")
        table.add_column("periods in window", justify="right")
        for name in factors:
            table.add_column(name, justify="right")
        for row in data["pairs"]:
            i = row["pair"]
            marks = []
            if i == dims["ten_period_dim"]:
                marks.append("d10")
            if i == dims["theoretical_critical_dim"]:
                marks.append("d_tcd")
            label = f"{i}" + (f" <{','.join(marks)}>" if marks else "")
            style = "red" if row["under_trained"] else None
            table.add_row(label, f"{row['period']:.4g}", f"{row['periods_in_window']:.3g}",
                          *(f"{factors[n][i]:.4g}" for n in factors), style=style)
        console.print(table)
        console.print(
            f"theoretical critical dim d_tcd = {dims['theoretical_critical_dim']}, "
            f"ten-period dim d10 = {dims['ten_period_dim']}; "
            f"{len(data['under_trained_pairs'])} of {self.geometry.rotary_dim // 2} pairs never complete a period "
            f"in the {data['original_length']}-token window (red)."
        )
        console.print("attention factor (cos/sin scale): " + ", ".join(
            f"{k} {v:.4f}" for k, v in data["attention_factor"].items()))

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data = self.to_dict()
        dims = self.critical_dims
        pairs = [row["pair"] for row in data["pairs"]]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        left.semilogy(pairs, [row["period"] for row in data["pairs"]], "k.-", label="period")
        left.axhline(data["original_length"], color="tab:blue", ls="--", label=f"original window {data['original_length']}")
        left.axhline(self.target_length, color="tab:green", ls="--", label=f"target {self.target_length}")
        for key, colour, label in (("ten_period_dim", "tab:orange", "d10"), ("theoretical_critical_dim", "tab:red", "d_tcd")):
            left.axvline(dims[key], color=colour, ls=":", label=f"{label} = {dims[key]}")
        left.set_xlabel("RoPE pair i")
        left.set_ylabel("period (tokens)")
        left.set_title(f"{self.name}: periods, base {self.geometry.rope_theta:g}, rotary dim {self.geometry.rotary_dim}")
        left.legend(fontsize=8)
        for name, values in data["factors"].items():
            label = "longrope2 (search seed: d_tcd, flat s)" if name == "longrope2" else name
            right.semilogy(pairs, values, ".-", label=label)
        right.axhline(self.scale, color="grey", ls=":", lw=0.8)
        right.axhline(2 * self.scale, color="grey", ls=":", lw=0.8)
        right.axvline(dims["theoretical_critical_dim"], color="tab:red", ls=":")
        right.set_xlabel("RoPE pair i")
        right.set_ylabel("rescale factor lambda_i")
        right.set_title(f"factors for {self.target_length} (s = {self.scale:g}; dotted: s and 2s)")
        right.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

