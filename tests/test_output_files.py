"""Output names after the series' stem, as IMOD names them, and the short links."""

import os

from icetide.output_files import DEFAULT_STEM, OutputNames, link_short_names


def test_names_follow_the_series_stem():
    names = OutputNames.for_source("/data/TS_07.mrc")
    assert (names.xf, names.tlt, names.exclude, names.star) == ("TS_07.xf", "TS_07.tlt", "TS_07.exclude", "TS_07.star")
    assert (names.tomogram, names.aligned, names.fbp) == ("TS_07_rec.mrc", "TS_07_ali.mrc", "TS_07_fbp.mrc")
    assert (names.half(1), names.half(2)) == ("TS_07_half1.mrc", "TS_07_half2.mrc")
    assert OutputNames.for_source("TS_07.st").stem == "TS_07"  # an IMOD stack
    assert OutputNames.for_source("project/CtfFind/job003/tilt_series/TS_07.star").stem == "TS_07"  # RELION-5
    assert OutputNames.for_source("00254.stack.mrc").stem == "00254.stack"  # only the last suffix goes
    assert OutputNames.for_source("my series.mrc").stem == "my_series"  # STAR and IMOD files take no spaces
    assert OutputNames.for_source(None).stem == DEFAULT_STEM


def test_links_point_at_the_files_and_replace_older_links(tmp_path):
    names = OutputNames("TS_07")
    (tmp_path / names.tomogram).write_bytes(b"rec")
    assert link_short_names(tmp_path, names) == ["tomogram.mrc"]  # no aligned stack yet: no link to it
    assert os.readlink(tmp_path / "tomogram.mrc") == "TS_07_rec.mrc"  # relative: the folder can move
    (tmp_path / names.aligned).write_bytes(b"ali")
    other = OutputNames("TS_08")
    (tmp_path / other.tomogram).write_bytes(b"rec8")
    (tmp_path / other.aligned).write_bytes(b"ali8")
    assert link_short_names(tmp_path, other) == ["tomogram.mrc", "aligned.mrc"]
    assert (tmp_path / "tomogram.mrc").read_bytes() == b"rec8" and (tmp_path / "aligned.mrc").read_bytes() == b"ali8"
