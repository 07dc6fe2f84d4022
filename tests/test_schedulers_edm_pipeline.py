"""EDM schedulers where the pipeline meets them: the NAMES presets on a checkpoint's config,
configs of other classes, the family rule of get_scheduler, and a tiny Stable Diffusion folder
whose scheduler_config.json is Playground v2.5's (EDMDPMSolverMultistepScheduler) run against
diffusers' pipelines: same latents, same seed (SDE noise), img2img (float32, <= 1e-4).
"""

import json
import logging
import shutil

import numpy as np
import pytest
from pipelines import build
from refharness import assert_rel, need
from test_schedulers_edm import DPM, EULER, PLAYGROUND, SD15, pair

import minisd
import minisd.schedulers as ms
from minisd.errors import InputError

TOL = 1e-4
PROMPTS = ["a watercolor painting of a lighthouse", "a cat"]
# the default scheduler names pipeline.py should give the two EDM classes
DEFAULT_NAMES = {"EDMEulerScheduler": "edm_euler", "EDMDPMSolverMultistepScheduler": "edm_dpmpp_2m"}


@pytest.mark.parametrize("name", ["edm_euler", "edm_dpmpp_2m", "edm_dpmpp_2m_sde"])
def test_names_on_playground_config(name):
    """get_scheduler builds the NAMES preset from the checkpoint's config, as diffusers'
    Cls.from_config(config, **overrides): the same sigmas and solver options."""
    diffusers = need("diffusers")
    cls_name, overrides = ms.NAMES[name]
    ref = getattr(diffusers, cls_name).from_config(PLAYGROUND, **overrides)
    ours = ms.get_scheduler(name, PLAYGROUND)
    assert type(ours).__name__ == cls_name
    for key, value in ours.config.items():
        assert ref.config[key] == value, key
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


def test_config_of_a_loaded_diffusers_scheduler(tmp_path):
    """A loaded config's _use_default_values are dropped by from_config (diffusers' rule)."""
    diffusers = need("diffusers")
    import json

    (tmp_path / "scheduler_config.json").write_text(
        json.dumps({"_class_name": DPM, "sigma_max": 14.6})
    )
    loaded = diffusers.EDMDPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert "sigma_min" in loaded.config["_use_default_values"]
    ref, ours = diffusers.EDMEulerScheduler.from_config(loaded.config), ms.EDMEulerScheduler
    ours = ours.from_config(loaded)
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    assert ours.config.sigma_max == 14.6
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


def test_built_from_a_beta_config_as_diffusers(caplog):
    """EDM classes take only their own keys from any config (the beta keys are dropped with
    an INFO note, as other schedulers' keys are); sigma range and sigma_data are defaults."""
    with caplog.at_level(logging.INFO, logger="minisd.schedulers"):
        ours = ms.EDMEulerScheduler.from_config(SD15)
    assert "beta_schedule" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert ours.config.sigma_min == 0.002 and ours.config.sigma_data == 0.5
    pair(EULER, SD15, 6)


def test_family_rule_of_get_scheduler():
    """A beta-schedule model cannot be sampled by an EDM sampler nor an EDM model by a
    beta-schedule one (both run and give noise in diffusers): InputError naming scheduler."""
    with pytest.raises(InputError, match="scheduler='edm_euler': an EDM sampler"):
        ms.get_scheduler("edm_euler", SD15)
    with pytest.raises(InputError, match=r"scheduler='euler'.*edm_dpmpp_2m"):
        ms.get_scheduler("euler", PLAYGROUND)
    no_class = {k: v for k, v in PLAYGROUND.items() if k != "_class_name"}
    with pytest.raises(InputError, match="scheduler='dpmpp_2m'"):
        ms.get_scheduler("dpmpp_2m", no_class)  # told apart by its keys (sigma_data)
    assert ms.config_family(no_class) == "edm" and ms.config_family(SD15) == "ddpm"
    assert ms.config_family({}) is None
    assert isinstance(ms.get_scheduler("edm_euler"), ms.EDMEulerScheduler)  # defaults
    assert isinstance(ms.get_scheduler("edm_euler", no_class), ms.EDMEulerScheduler)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(diffusers' pipeline, a tiny SD1 folder with Playground's scheduler config, the same
    folder with its own PNDM config)."""
    diffusers = need("diffusers")
    root = tmp_path_factory.mktemp("edm_pipes")
    ref = build("sd1", root / "pndm")
    shutil.copytree(root / "pndm", root / "edm")
    (root / "edm" / "scheduler" / "scheduler_config.json").write_text(json.dumps(PLAYGROUND))
    ref.scheduler = diffusers.EDMDPMSolverMultistepScheduler.from_config(PLAYGROUND)
    return ref, root / "edm", root / "pndm"


@pytest.fixture
def pipes(folders):
    """(diffusers' pipeline, minisd's on the EDM folder, whose checkpoint class maps to its
    default name)."""
    from minisd import pipeline

    for cls_name, name in DEFAULT_NAMES.items():
        assert pipeline._CLASS_TO_NAME[cls_name] == name
    ref, edm, _ = folders
    return ref, minisd.StableDiffusion.from_pretrained(edm)


def _run_ref(pipe, name, **kw):
    """diffusers' ``pipe`` with minisd's scheduler ``name`` (None: the folder's own)."""
    torch, diffusers = need("torch", "diffusers")
    saved = pipe.scheduler
    if name is not None:
        cls_name, overrides = ms.NAMES[name]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(PLAYGROUND, **overrides)
    if "seed" in kw:
        kw["generator"] = torch.Generator().manual_seed(kw.pop("seed"))
    if "latents" in kw:
        kw["latents"] = torch.from_numpy(kw["latents"])
    try:
        with torch.no_grad():
            return pipe(**kw).images.numpy()
    finally:
        pipe.scheduler = saved


def test_folder_default_is_its_edm_scheduler(pipes):
    _, ours = pipes
    assert ours.scheduler_name == "edm_dpmpp_2m"
    s = ours.make_scheduler()
    assert type(s).__name__ == "EDMDPMSolverMultistepScheduler" and s.config.sigma_data == 0.5


@pytest.mark.parametrize("scheduler", [None, "edm_euler", "edm_dpmpp_2m"])
def test_txt2img_same_latents(pipes, scheduler):
    ref, ours = pipes
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=4,
              guidance_scale=6.0, height=64, width=64, latents=latents,
              output_type="latent")  # fmt: skip
    expect = _run_ref(ref, scheduler, **kw)
    got = ours(**kw, scheduler=scheduler, progress=False)
    assert_rel(got, expect, TOL, f"{scheduler} latents")
    assert np.abs(got - latents * (80.0**2 + 1) ** 0.5).max() > 1.0  # it did denoise


def test_sde_same_seed(pipes):
    """The SDE solver's per-step noise from minisd.rng, in diffusers' order after the latents."""
    ref, ours = pipes
    kw = dict(prompt=PROMPTS[0], num_inference_steps=3, guidance_scale=7.5, height=64,
              width=64, num_images_per_prompt=2, output_type="latent")  # fmt: skip
    expect = _run_ref(ref, "edm_dpmpp_2m_sde", seed=7, **kw)
    got = ours(**kw, seed=7, scheduler="edm_dpmpp_2m_sde", progress=False)
    assert_rel(got, expect, TOL, "edm_dpmpp_2m_sde seeded")
    ode = ours(**kw, seed=7, scheduler="edm_dpmpp_2m", progress=False)
    assert np.abs(ode - got).max() > 1e-2 * np.abs(got).max()  # the noise did enter


@pytest.mark.parametrize("scheduler", ["edm_euler", "edm_dpmpp_2m"])
def test_img2img_same_seed(pipes, scheduler):
    """strength cuts the schedule; set_begin_index and add_noise = x_0 + sigma n as diffusers."""
    diffusers = need("diffusers")
    from PIL import Image

    ref, ours = pipes
    i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    kw = dict(prompt=PROMPTS[1], image=image, strength=0.6, num_inference_steps=5,
              guidance_scale=5.0, output_type="latent")  # fmt: skip
    expect = _run_ref(i2i, scheduler, seed=3, **kw)
    got = ours(**kw, seed=3, scheduler=scheduler, progress=False)
    assert_rel(got, expect, TOL, f"img2img {scheduler}")


def test_pipeline_refuses_the_other_family(folders):
    """An SD1 model (PNDM config) and an EDM sampler: InputError naming scheduler."""
    _, _, pndm = folders
    pipe = minisd.StableDiffusion.from_pretrained(pndm)
    with pytest.raises(InputError, match="scheduler='edm_euler'"):
        pipe("a cat", num_inference_steps=2, height=64, width=64, scheduler="edm_euler",
             output_type="latent", progress=False)  # fmt: skip
