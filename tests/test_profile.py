"""Profiles: validated at load, unknown keys are errors naming them, --set overrides."""

import pytest

from echat.pipelines.profile import ProfileError, available_profiles, load_profile


def test_local_profile_loads_with_offline_backends():
    profile = load_profile("local")
    stages = {entry.slot: entry.backend for entry in profile.enabled_stages()}
    assert list(stages) == ["decode", "vad", "asr", "gender", "age", "emotion", "events", "metrics", "filter", "reply", "tts"]
    assert stages["vad"] == "silero" and stages["asr"] == "pocketsphinx"
    assert stages["reply"] == "template" and stages["tts"] == "espeak"
    assert "local" in available_profiles()


@pytest.mark.parametrize(
    "override, named",
    [
        ("vadd.backend=silero", "vadd"),  # a mistyped section (or slot)
        ("filter.params.min_snr=3", "filter.params.min_snr"),  # a mistyped option
        ("output.rows_per_shrd=10", "output.rows_per_shrd"),
        ("vad.params.treshold=0.4", "vad.params.treshold"),  # a mistyped backend parameter
        ("vad.batch_sise=4", "batch_sise"),  # a mistyped entry key
    ],
)
def test_unknown_key_is_an_error_naming_it(override, named):
    with pytest.raises(ProfileError, match=named.replace(".", r"\.")):
        load_profile("local", [override])


def test_unknown_key_in_a_profile_file(tmp_path):
    text = (load_profile.__globals__["configs_dir"]() / "local.yaml").read_text()
    path = tmp_path / "typo.yaml"
    path.write_text(text.replace("trust_manifest:", "trust_manifets:"))
    with pytest.raises(ProfileError, match="trust_manifets"):
        load_profile(str(path))


def test_unknown_backend_is_named():
    with pytest.raises(ProfileError, match="gpt-99"):
        load_profile("local", ["reply.backend=gpt-99"])


def test_set_overrides_values_with_yaml_types():
    profile = load_profile("local", ["vad.params.threshold=0.35", "filter.params.min_snr_db=5", "beam.direct_num_workers=2",
                                     "tts.max_in_flight=3", "gender.backend=none"])
    assert profile.stage("vad").params["threshold"] == 0.35
    assert profile.stage("filter").params["min_snr_db"] == 5.0
    assert profile.beam.direct_num_workers == 2
    assert profile.stage("tts").max_in_flight == 3
    assert "gender" not in [entry.slot for entry in profile.enabled_stages()]


def test_bad_value_type_is_reported():
    with pytest.raises(ProfileError, match="rows_per_shard"):
        load_profile("local", ["output.rows_per_shard=-3"])


def test_unknown_profile_name_lists_available():
    with pytest.raises(ProfileError, match="available: .*local"):
        load_profile("nonexistent-profile")


def test_a_stage_of_your_own_is_one_entry_naming_its_class(tmp_path):
    text = (load_profile.__globals__["configs_dir"]() / "local.yaml").read_text()
    entry = "  - slot: loudness_check\n    backend: echat.labelers.filters:QualityFilter\n    params: {max_duration_s: 20}\n\n"
    path = tmp_path / "custom.yaml"
    path.write_text(text.replace("  - slot: reply\n", entry + "  - slot: reply\n"))
    profile = load_profile(str(path), ["loudness_check.params.min_duration_s=2"])
    slots = [e.slot for e in profile.enabled_stages()]
    assert slots.index("loudness_check") == slots.index("reply") - 1
    assert profile.stage("loudness_check").params == {"max_duration_s": 20, "min_duration_s": 2}


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["filter.params.min_duration_s=40"], r"min_duration_s \(40\) exceeds max_duration_s"),  # the class's own check
        (["precedence=[manifest, heuristic]"], "asr .*could never write anything.*origin .model."),
        (["precedence=[model, heuristic]"], "'manifest' is not in precedence"),
        (["precedence=[model, model]"], "at most once"),
        (["vad.backend=none"], "no stage cuts files into segments"),
        (["tts.resources={gpu: 1}"], "Unknown resource hint: gpu"),
        (["asr.backend=nosuch.module:Thing"], "cannot load backend class"),
        (["asr.backend=echat.pipelines.profile:Profile"], "is not an echat.schemas.stage.Stage"),
    ],
)
def test_stage_list_problems_are_errors_at_load(overrides, named):
    with pytest.raises(ProfileError, match=named):
        load_profile("local", overrides)


def test_duplicate_slot_is_an_error(tmp_path):
    text = (load_profile.__globals__["configs_dir"]() / "local.yaml").read_text()
    path = tmp_path / "twice.yaml"
    path.write_text(text.replace("  - slot: emotion\n", "  - slot: gender\n"))
    with pytest.raises(ProfileError, match="slot 'gender' appears twice"):
        load_profile(str(path))
