"""Write docs/CONFIGURATION.md, the reference of every setting of a reconstruction, from the schema.

Usage::

    python tools/config_reference.py            # (re)write docs/CONFIGURATION.md
    python tools/config_reference.py --stdout   # print it instead
    python tools/config_reference.py --check    # exit 1 when docs/CONFIGURATION.md is not what would be written

Every key of :class:`icetide.config.ReconstructConfig` (pydantic) gets a row: dotted path, default, type and
allowed values (from the validators), unit, description and the ``icetide reconstruct`` option that sets it.
The description is the field's own ``description``; where the schema has none, the help of the option that sets
the key, else the text in ``FALLBACK`` below (taken from the module's docstrings). ``tests/test_docs.py`` fails
when docs/CONFIGURATION.md is not exactly what this writes.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docgen import write_or_check  # noqa: E402  (beside this script)

import typer
from pydantic import BaseModel

from icetide.cli import reconstruct_cmd
from icetide.cli.main import app
from icetide.config import FIT_GROUPS, ReconstructConfig

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "CONFIGURATION.md"

# Descriptions of the keys whose schema field has none and no option sets directly (from the docstrings of
# icetide.config, icetide.fit, icetide.volume.encoding and icetide.volume.mlp, and docs/CONVENTIONS.md).
FALLBACK = {
    "volume.n_levels": "levels of the multiresolution hash encoding (Instant-NGP); level l has the resolution "
    "base_resolution * per_level_scale**l along the box's longest axis",
    "volume.n_features": "features stored per vertex and level; the MLP sees n_levels * n_features inputs",
    "volume.log2_table_size": "rows of the table of each level, as a power of 2: a level with more vertices than "
    "that is indexed by a spatial hash, the others densely",
    "volume.base_resolution": "resolution of the coarsest level along the box's longest axis (the other axes in "
    "proportion to the box)",
    "volume.per_level_scale": "factor between the resolutions of consecutive levels",
    "volume.interpolation": "interpolation of a cell's 8 corner features: linear (trilinear) or smoothstep",
    "volume.hidden": "width of each hidden layer of the MLP (ReLU) that turns the encoded features into a density",
    "volume.n_hidden_layers": "number of hidden layers of the MLP",
    "deform.shifts": "estimate a shift per tilt (tau, paper eq. 1)",
    "deform.rotations": "estimate an in-plane rotation per tilt (alpha), penalised by penalty_rotation on its "
    "deviation from the start",
    "deform.local": "estimate a local displacement field per tilt (phi) on the control points of local_grid; "
    "reconstruct --no-local sets it false",
    "deform.local_grid": "control points of each tilt's local field, (rows along the image's v axis, columns "
    "along u), spread from the first to the last pixel centre (docs/CONVENTIONS.md)",
    "deform.local_interpolation": "interpolation of the local field between control points: bicubic (Keys, "
    "a = -0.75) or bilinear, as PyTorch's grid_sample with align_corners=True",
    "fit.lr_volume": "Adam learning rate of the volume's parameters (hash tables and MLP; 1e-2 as the paper)",
    "fit.lr_decay_factor": "every learning rate is multiplied by this every lr_decay_every epochs",
    "fit.validation_fraction": "fraction of the pixels held out at random for validation (early stopping, "
    "the best state); 0 = none",
    "fit.checkpoint_minutes": "write checkpoint.pt (for --resume) at most this often",
}

# Units of the keys that have one (the type and the description say the rest).
UNITS = {
    "bin": "factor",
    "thickness": "voxels",
    "pixel_size_A": "A",
    "tilt_axis_angle_deg": "degrees",
    "volume.n_levels": "levels",
    "volume.n_features": "features",
    "volume.log2_table_size": "log2 of rows",
    "volume.base_resolution": "cells",
    "volume.per_level_scale": "factor",
    "volume.hidden": "neurons",
    "volume.n_hidden_layers": "layers",
    "deform.projection_matching": "rounds",
    "deform.axis_search_deg": "degrees",
    "deform.local_grid": "control points",
    "deform.penalty_rotation": "weight, on radians",
    "deform.penalty_shift": "weight, on pixels",
    "deform.penalty_local": "weight, on pixels",
    "deform.penalty_smooth": "weight, on px^2",
    "fit.epochs": "epochs",
    "fit.max_minutes": "minutes",
    "fit.tilts_per_step": "tilts",
    "fit.lattice_rows": "rows",
    "fit.max_memory_gb": "GiB",
    "fit.rays_per_tilt": "pixels",
    "fit.samples_per_voxel": "samples per voxel",
    "fit.lr_shift_px": "pixels",
    "fit.lr_rotation_deg": "degrees",
    "fit.lr_local_px": "pixels",
    "fit.lr_axis_deg": "degrees",
    "fit.lr_gain": "log gain",
    "fit.lr_offset": "data spreads",
    "fit.warmup_epochs": "epochs",
    "fit.coarse_to_fine_epochs": "epochs",
    "fit.local_delay_epochs": "epochs",
    "fit.binned_epochs": "epochs",
    "fit.binned_bands": "bands",
    "fit.lr_decay_every": "epochs",
    "fit.lr_decay_factor": "factor",
    "fit.validation_fraction": "fraction",
    "fit.validate_every": "epochs",
    "fit.patience": "validations",
    "fit.checkpoint_minutes": "minutes",
    "fit.max_rollbacks": "epochs",
    "ctf.voltage_kV": "kV",
    "ctf.spherical_aberration_mm": "mm",
    "ctf.amplitude_contrast": "fraction",
    "ctf.phase_tolerance_deg": "degrees",
    "intensity.highpass_A": "A (Gaussian sigma)",
}

TOP_LEVEL = "The geometry of the reconstruction: sampling, thickness, pixel size, tilt axis, the specimen's extent."

HEADER = """\
# Configuration

<!-- Generated by `python tools/config_reference.py` from the schema (src/icetide/config.py); edit the schema's
descriptions or the tool, not this file. tests/test_docs.py fails when this file is not what the tool writes. -->

Every setting of a reconstruction, with its default. `icetide reconstruct --config FILE` (and `icetide batch
--config FILE`) reads a YAML file holding any subset of them, nested as below (`fit: {patience: 20}` sets
`fit.patience`). What wins: the defaults, then the `--config` file (on `--resume`, the run's own `config.yaml`),
then the command-line options. Every run writes all its settings, defaults included, to `OUT/config.yaml`, which
can be given back to `--config`. An unknown key or a bad value stops the run before it starts with one line
naming the key. `null` (YAML) is the schema's `None`: "auto" or "none" as each key says.

```bash
cat > settings.yaml <<'EOF'
deform:
  gain: true
fit:
  tilt_weighting: cos
  patience: 20
EOF
icetide reconstruct sim/tilt_series.mrc --angles sim/tilt_series.tlt --thickness 48 --config settings.yaml -o rec_settings
```

(`sim/` is made by the first command of docs/CLI.md "Simulated data with known truth".)

## Estimates and data terms that are off by default

- a per-tilt intensity gain, for exposure that varies across the series: `deform: {gain: true}`;
- an intensity level for the whole series or for each tilt: `deform: {offset: common}` or `per_tilt`
  (docs/CONVENTIONS.md "Intensity units");
- a refinement of the tilt-axis angle during the fit: `deform: {axis_offset: true}` (see docs/BENCHMARKS.md for
  its limits);
- rounds of projection matching after the coarse alignment: `deform: {projection_matching: 8}` (it lowered the
  EMPIAR-10499 result, docs/REAL_DATA.md);
- a loss that weights each tilt by cos(tilt): `fit: {tilt_weighting: cos}`;
- an L2 or Poisson data term: `--loss l2`, `--loss poisson` for very low counts (below about 1 count per pixel L1
  loses the signal, docs/RESULTS.md section 8);
- a random-walk prior on the shifts along the tilt angles: `deform: {penalty_smooth: W}` (it did not help in
  docs/RESULTS.md section 7).

Memory and speed: `fit.max_memory_gb` (`--max-memory`), `fit.precision` (`--mixed-precision`),
`fit.recompute_field` and `fit.lattice_rows` (docs/TROUBLESHOOTING.md "Memory"; docs/SCALING.md).
"""


def _options() -> dict[str, tuple]:
    """``{dotted key: (reconstruct option, direct)}`` for the options that set a key
    (``reconstruct_cmd.DIRECT_OPTIONS`` and ``SWITCH_OPTIONS``): ``direct`` when the key takes the option's own
    value (``--bin``), not when a flag switches it (``--mixed-precision``)."""
    command = typer.main.get_command(app).commands["reconstruct"]
    params = {p.name: p for p in command.get_params(command.context_class(command, info_name="reconstruct"))}
    found = {key: (params[name], True) for key, name in reconstruct_cmd.DIRECT_OPTIONS.items()}
    found.update({key: (params[name], False) for key, (name, _) in reconstruct_cmd.SWITCH_OPTIONS.items()})
    return found


def _leaves(model: type[BaseModel], prefix: str = ""):
    """``(dotted key, field, section model)`` of every setting, depth first in the schema's order."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaves(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field, model


def schema_keys() -> list[str]:
    """Every setting's dotted key."""
    return [key for key, _, _ in _leaves(ReconstructConfig)]


def _type(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in inner) + " or `null`"
    if typing.get_origin(annotation) is tuple:
        return "[" + ", ".join(_type(a) for a in args) + "]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = []
    for item in field.metadata:
        for attr, sign in words.items():
            if getattr(item, attr, None) is not None:
                out.append(f"{sign} {getattr(item, attr)}")
    return ", ".join(out)


def _value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _rst_to_markdown(text: str) -> str:
    """Docstring markup as markdown: ``x`` and :role:`x` become `x`."""
    return re.sub(r":\w+:`([^`]+)`", r"`\1`", text.replace("``", "`"))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def described(key: str, field, options: dict) -> str:
    """The key's description (see the module docstring for where it comes from); ``options`` as
    :func:`_options` returns."""
    if field.description:
        return field.description
    if key in options and options[key][1] and options[key][0].help:
        return options[key][0].help
    return FALLBACK.get(key, "")


def _fit_group(key: str) -> str:
    """The concern (``icetide.config.FIT_GROUPS``) of the ``fit`` key ``key``."""
    name = key.split(".", 1)[1]
    return next(title for title, names in FIT_GROUPS.items() if name in names)


def render() -> str:
    """The whole of docs/CONFIGURATION.md."""
    keys = schema_keys()
    for table in (FALLBACK, UNITS):
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise KeyError(f"tools/config_reference.py names settings the schema does not have: {unknown}")
    options = _options()
    defaults = ReconstructConfig().model_dump(mode="json")
    parts = [HEADER.rstrip("\n")]
    section = group = None
    table = "| key | default | type | unit | description |\n| --- | --- | --- | --- | --- |"
    for key, field, model in _leaves(ReconstructConfig):
        where = key.rsplit(".", 1)[0] if "." in key else ""
        if where != section:
            section = where
            title = f"`{where}`" if where else "Top level"
            doc = _rst_to_markdown(" ".join(inspect.cleandoc(model.__doc__ or "").split())) if where else TOP_LEVEL
            parts.append(f"\n## {title}\n\n{doc}\n")
            if where != "fit":
                parts.append(table)
        if where == "fit" and _fit_group(key) != group:
            gap = "" if group is None else "\n"  # a blank line after the previous group's table
            group = _fit_group(key)
            parts.append(f"{gap}### `fit`: {group}\n\n{table}")
        value = defaults
        for part in key.split("."):
            value = value[part]
        kind = _type(field.annotation)
        bounds = _bounds(field)
        text = described(key, field, options).rstrip(".")
        if key in options:
            text += f". Option: `{options[key][0].opts[0]}`"
        parts.append(
            f"| `{key}` | `{_value(value)}` | {kind}{', ' + bounds if bounds else ''} | {UNITS.get(key, '')} | "
            f"{_cell(text)}. |"
        )
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    return write_or_check(OUT, render(), argv, "tools/config_reference.py")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
