"""The records' file formats: what is written reads back equal, a damaged or foreign file is named with
what is wrong, and a file in the format ramserve wrote before the records existed still reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ramserve.plan import load_plan, make_plan
from ramserve.profile import analyze, load_profile
from ramserve.records import PLAN_FORMAT, PROFILE_FORMAT, Plan, Profile, RecordError
from ramserve.settings import load_settings
from ramserve.source import open_source

from .conftest import user_config


@pytest.fixture
def profile_and_plan(tiny_dir: Path) -> tuple[Profile, Plan]:
    profile = analyze(open_source(str(tiny_dir), load_settings()), progress=False)
    return profile, make_plan(profile, "45%", load_settings())


def test_written_records_read_back_equal(tmp_path: Path, profile_and_plan) -> None:
    profile, plan = profile_and_plan
    profile.write(tmp_path / "profile.json")
    plan.write(tmp_path / "plan.json")
    assert Profile.read(tmp_path / "profile.json") == profile
    again = Plan.read(tmp_path / "plan.json")
    assert again == plan and again.hash == plan.hash
    on_disk = json.loads((tmp_path / "plan.json").read_text())
    assert on_disk["format"] == PLAN_FORMAT and on_disk["hash"] == plan.hash
    assert json.loads((tmp_path / "profile.json").read_text())["format"] == PROFILE_FORMAT


def test_the_plan_hash_follows_what_the_weights_depend_on(profile_and_plan) -> None:
    _, plan = profile_and_plan
    data = plan.to_json()
    other = Plan.from_json({**data, "quantizer": {**data["quantizer"], "refits": 9}})
    assert other.hash != plan.hash  # another quantizer writes other weights
    renamed = Plan.from_json({**data, "note": "edited", "hash": "0" * 16})
    assert renamed.hash == plan.hash  # the stored hash is derived, never trusted


def test_damaged_and_foreign_files_are_named(tmp_path: Path, profile_and_plan) -> None:
    _, plan = profile_and_plan
    path = tmp_path / "plan.json"
    data = plan.to_json()
    path.write_text(json.dumps({**data, "total_bytes": "many"}))
    with pytest.raises(RecordError, match=r"plan.json is damaged: total_bytes"):
        Plan.read(path)
    path.write_text(json.dumps({**data, "format": "ramserve-plan/0"}))
    with pytest.raises(RecordError, match="not a ramserve-plan/1 file"):
        Plan.read(path)
    path.write_text("{not json")
    with pytest.raises(RecordError, match="plan.json is not valid JSON"):
        Plan.read(path)
    from ramserve.errors import BudgetError

    with pytest.raises(BudgetError, match="cannot use plan .*missing"):
        load_plan(tmp_path / "none.json")


def test_a_profile_edited_after_writing_fails_its_checksum(
    tmp_path: Path, profile_and_plan
) -> None:
    profile, _ = profile_and_plan
    data = profile.to_json()
    data["modules"][0]["importance"] *= 2
    with pytest.raises(RecordError, match="does not match its checksum"):
        Profile.from_json(data)


def test_a_cached_profile_is_used_by_the_settings_it_was_made_with(
    tiny_dir: Path, ramserve_home: Path
) -> None:
    source = open_source(str(tiny_dir), load_settings())
    analyze(source, progress=False)
    assert load_profile(source) is not None
    ramserve_home.mkdir(parents=True, exist_ok=True)
    user_config(ramserve_home, "[analysis]\nbits = [4, 8]\n")
    assert load_profile(open_source(str(tiny_dir), load_settings())) is None
    assert load_profile(source) is not None  # the source keeps the settings it was opened with
