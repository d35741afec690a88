"""scheduler/scheduler_config.json -> the schedule settings: diffusers' semantics, unsupported settings refused."""

import json

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from d4k_jax.diffusion.flow import FLUX_DEV, SD3_MEDIUM, SchedulerConfig
from d4k_jax.pipelines.scheduler import load_scheduler

FLUX_INDEX = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def _pipeline(root, scheduler=None, config=None, index=FLUX_INDEX):
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index))
    if scheduler is not None:
        scheduler.save_pretrained(root / "scheduler")
    if config is not None:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return root


def test_no_scheduler_folder_keeps_the_base_models_schedule(tmp_path):
    assert load_scheduler(_pipeline(tmp_path), FLUX_DEV) == FLUX_DEV
    assert load_scheduler(tmp_path, SD3_MEDIUM) == SD3_MEDIUM


@pytest.mark.parametrize(
    "settings",
    [
        dict(shift=1.0, use_dynamic_shifting=False),  # FLUX.1-schnell
        dict(shift=3.0),  # SD3 / SD3.5
        dict(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.6, base_image_seq_len=128, max_image_seq_len=8192),
        dict(shift=2.5, num_train_timesteps=500),
    ],
)
def test_reads_what_diffusers_saves(tmp_path, settings):
    """Every key diffusers writes (the unsupported ones at their defaults) is accepted; ours equal its config."""
    scheduler = FlowMatchEulerDiscreteScheduler(**settings)
    got = load_scheduler(_pipeline(tmp_path, scheduler), FLUX_DEV)
    assert got == SchedulerConfig(**{k: scheduler.config[k] for k in SchedulerConfig.__dataclass_fields__})


def test_left_out_keys_get_the_class_defaults_as_in_diffusers(tmp_path):
    """A file without `shift` is shift 1.0 (diffusers' default), not the base model's 3.0."""
    got = load_scheduler(_pipeline(tmp_path, config={"_class_name": "FlowMatchEulerDiscreteScheduler"}), SD3_MEDIUM)
    assert got == SchedulerConfig() and got.shift == 1.0 and not got.use_dynamic_shifting


def test_unsupported_settings_are_refused_by_name_all_at_once(tmp_path):
    config = {
        "_class_name": "FlowMatchHeunDiscreteScheduler",
        "shift": 3.0,
        "use_karras_sigmas": True,
        "shift_terminal": 0.02,
        "invert_sigmas": True,
        "stochastic_sampling": True,
        "time_shift_type": "linear",
        "use_flow_sigmas": True,
        "use_beta_sigmas": False,  # at its default: fine
    }
    index = {**FLUX_INDEX, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    folder = _pipeline(tmp_path, config=config, index=index)
    with pytest.raises(ValueError) as e:
        load_scheduler(folder, FLUX_DEV)
    message = str(e.value)
    assert str(folder / "scheduler" / "scheduler_config.json") in message
    for needle in [
        "'FlowMatchHeunDiscreteScheduler'",
        "model_index.json 'EulerDiscreteScheduler'",
        "use_karras_sigmas=True",
        "shift_terminal=0.02",
        "invert_sigmas=True",
        "stochastic_sampling=True",
        "time_shift_type='linear'",
        "use_flow_sigmas=True",
    ]:
        assert needle in message
    assert "use_beta_sigmas" not in message


def test_wrong_types_are_named(tmp_path):
    config = {"shift": "3", "use_dynamic_shifting": 1, "max_image_seq_len": 0, "base_shift": None}
    with pytest.raises(ValueError) as e:
        load_scheduler(_pipeline(tmp_path, config=config), FLUX_DEV)
    for needle in ["shift='3'", "use_dynamic_shifting=1", "max_image_seq_len=0"]:
        assert needle in str(e.value)
    with pytest.raises(ValueError, match=r"base_shift=None \(expected a number\)"):
        load_scheduler(_pipeline(tmp_path / "b", config={"use_dynamic_shifting": True, "base_shift": None}), FLUX_DEV)
    # unused without a dynamic shift: null is what diffusers accepts there
    assert load_scheduler(_pipeline(tmp_path / "c", config={"base_shift": None}), FLUX_DEV) == SchedulerConfig()


def test_unreadable_config_files(tmp_path):
    folder = _pipeline(tmp_path / "a")
    (folder / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no scheduler_config\.json"):
        load_scheduler(folder, FLUX_DEV)
    (folder / "scheduler" / "scheduler_config.json").write_text("{shift: 3")
    with pytest.raises(ValueError, match=r"scheduler_config\.json: not valid JSON"):
        load_scheduler(folder, FLUX_DEV)
    (folder / "scheduler" / "scheduler_config.json").write_text("[3]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_scheduler(folder, FLUX_DEV)


def test_the_converted_directory_keeps_the_scheduler(tmp_path):
    """conversion copies scheduler/ as it is, so a converted directory samples with the same schedule."""
    from conversion.convert import convert

    src = _pipeline(tmp_path / "src", FlowMatchEulerDiscreteScheduler(shift=1.0))
    convert(src, tmp_path / "dst")
    assert load_scheduler(tmp_path / "dst", FLUX_DEV) == load_scheduler(src, FLUX_DEV) == SchedulerConfig(shift=1.0)
