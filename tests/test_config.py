"""The settings schema (icetide.config)."""

from icetide.config import FIT_GROUPS, FitSettings


def test_every_fit_setting_belongs_to_one_concern_in_the_schemas_order():
    grouped = [name for names in FIT_GROUPS.values() for name in names]
    assert grouped == list(FitSettings.model_fields)
