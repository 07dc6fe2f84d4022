"""Every sampler against a model whose answer is known: data drawn from a Gaussian, and the
exact noise predictor for it in place of a UNet.

    python examples/samplers_on_a_gaussian.py [--steps 10 25 50] [--samples 20000]

If the data is x0 ~ N(mu, s^2) (each number independently), the forward process
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM, Ho et al. 2020) keeps every x_t Gaussian,
and the best possible noise prediction, the one a perfectly trained network would learn, is
the posterior mean

    E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t).

Feeding that to each sampler and comparing the mean and spread of what comes out with mu and s
measures the sampler alone: its discretization error and the noise left by the schedule's last
step. No weights, no download; well under a second per sampler. The scheduler configuration
is Stable Diffusion's (scaled_linear betas, 1000 training steps, steps_offset 1, "leading"
timestep spacing as single-file conversions write it; --spacing changes it).

What the table shows with the defaults (mu 0.5, s 0.3; 10, 25 and 50 steps):
- every deterministic sampler's mean is low, by 0.034-0.041 s at 50 steps and 0.034-0.043 s
  at 25 (deis 0.047 s, dpmpp_2s / dpmpp_3s 0.028-0.031 s: their last steps, below): even at
  t = 999 SD's schedule is not pure noise (alpha_bar = 0.0047, so x_t still holds 0.068 mu),
  yet sampling starts from N(0, 1); the exact flow maps that missing 0.068 mu to
  -0.068 mu s / sd(x_t) = -0.034 s at the end (the header line; Lin et al. 2024,
  "Common diffusion noise schedules and sample steps are flawed"). At 10 steps the solvers'
  own error adds to it: from -0.035 s (dpmpp_2m_karras) and -0.040 to -0.044 s (dpmpp_2m,
  unipc, euler, ddim) to -0.054 s (plms, pndm), -0.055 s (lms), -0.065 s (heun) and -0.070 s
  (dpm2). The ancestral and SDE samplers (ddpm, euler_a, dpm2_a, dpmpp_2m_sde and their Karras
  variants) re-inject noise, which washes the bias out (their mean -0.002 to +0.009 s);
- DDIM and Euler converge at first order (std error ~ 1/steps). The spread of the data is
  decided at low noise levels; the multistep and second-order solvers (LMS, PLMS/PNDM, Heun)
  and the Karras schedule (which spends its steps there: dpmpp_2m_karras, dpm2_karras,
  dpm2_a_karras, dpmpp_2m_sde_karras) are within ~1% by 50 steps;
- samplers whose last step jumps from the last timestep (t = 20 at 50 steps) straight to the
  data lose spread there: dpmpp_2s and dpmpp_3s (always "linspace" spaced: diffusers'
  singlestep scheduler has no timestep_spacing) are ~10% too narrow at 50 steps, like Euler.
  deis ends at t = 0's sigma instead, with a second-order noise extrapolation that overshoots
  (+0.03 s at 25 and 50 steps; +0.01 s at 200 with --spacing trailing), as diffusers' DEIS
  does;
- lcm and tcd are samplers for consistency-distilled models, which map x_t to a sample of the
  data; the exact eps predictor here is not one: its x_0 estimate is the posterior mean, which
  has less spread than the data, so lcm (which re-noises that estimate every step) stays ~37%
  too narrow however many steps it takes (and takes at most original_inference_steps = 50:
  n/a above). tcd with gamma (eta) = 0, as run here, jumps only to the next timestep and
  converges like DDIM;
- dpmpp_2m and unipc with "leading" spacing lag, and get worse past ~100 steps (try --steps
  200 500): diffusers spaces their timesteps by 1000 // (steps + 1) from 0, so 50 steps run
  from t = 951 down to 20 (then one jump to the data), and 500 steps start at t = 501, from
  pure noise. minisd reproduces that, as it must; --spacing trailing or linspace avoids it.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import _common  # noqa: F401 (minisd from this checkout)
import numpy as np

from minisd.errors import InputError
from minisd.schedulers import NAMES, config_family, get_scheduler, sample_loop
from weights_tools.presets import scheduler_config


def beta_schedule_names():
    """The scheduler names that run on SD's beta schedule; the EDM ones (edm_*: continuous
    sigmas and Karras et al.'s preconditioning, a different model interface) are checked on the
    exact Gaussian denoiser in tests/test_schedulers_edm.py instead."""
    return [n for n in NAMES if config_family({"_class_name": NAMES[n][0]}) != "edm"]


def exact_eps(alphas_cumprod, mu, s):
    """The optimal eps-prediction model for x0 ~ N(mu, s^2), as a function of (x_t, t)."""
    log_sigmas = 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)  # (T,)

    def model(x, t):
        # Fractional t (Karras-style schedules): the noise level diffusers interpolates there.
        sigma2 = np.exp(2 * np.interp(float(t), np.arange(len(log_sigmas)), log_sigmas))
        abar = 1.0 / (1.0 + sigma2)  # alpha_bar_t = 1 / (1 + sigma_t^2)
        var = abar * s**2 + 1 - abar  # Var(x_t)
        return (np.sqrt(1 - abar) * (x - np.sqrt(abar) * mu) / var).astype(x.dtype)

    return model


def normal_quantiles(n):
    """n standard-normal numbers without sampling noise: N(0, 1)'s quantiles at (i + 1/2) / n
    (mean 0 exactly, std 1 - O(log n / n)). For a deterministic sampler, whatever error the
    result then shows is the sampler's own."""
    inv = statistics.NormalDist().inv_cdf
    return np.array([inv((i + 0.5) / n) for i in range(n)])


def exact_flow(abar_start, abar_end, noise, mu, s):
    """Where the exact probability-flow ODE takes ``noise`` placed at noise level
    ``abar_start``: x_t's law N(sqrt(abar) mu, abar s^2 + 1 - abar) is carried affinely, so
    x_end = m_end + sd_end (x_start - m_start) / sd_start. Returns the result's (mean, std)."""
    m0, m1 = np.sqrt(abar_start) * mu, np.sqrt(abar_end) * mu
    sd0, sd1 = np.sqrt(abar_start * s**2 + 1 - abar_start), np.sqrt(abar_end * s**2 + 1 - abar_end)
    x = m1 + sd1 * (noise - m0) / sd0
    return x.mean(), x.std()


def run(name, steps, *, mu, s, noise, spacing="leading", seed=0):
    """Final samples of scheduler ``name`` after ``steps`` steps from ``noise`` (n,)."""
    sched = get_scheduler(name, dict(scheduler_config(), timestep_spacing=spacing))
    model = exact_eps(sched.alphas_cumprod.astype(np.float64), mu, s)
    rng = np.random.default_rng(seed)  # the ancestral samplers' noise
    x = noise.astype(np.float32).reshape(1, 1, 1, -1)  # one sample per number
    return sample_loop(sched, model, x, num_inference_steps=steps, rng=rng).ravel()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--mu", type=float, default=0.5)
    p.add_argument("--s", type=float, default=0.3)
    p.add_argument("--schedulers", nargs="+", default=sorted(beta_schedule_names()))
    p.add_argument("--spacing", default="leading", choices=["leading", "trailing", "linspace"])
    args = p.parse_args(argv)
    mu, s, noise = args.mu, args.s, normal_quantiles(args.samples)
    abar = get_scheduler("ddim", scheduler_config()).alphas_cumprod.astype(np.float64)
    m, sd = exact_flow(abar[-1], 1.0, noise, mu, s)
    print(f"data N({mu}, {s}^2), {args.spacing} spacing, {args.samples} samples per run")
    print("error of the samples' mean / std, relative to s; the exact flow from t = 999 to the")
    print(f"data gives {(m - mu) / s:+.3f} / {(sd - s) / s:+.3f}")
    print(f"{'scheduler':20s}" + "".join(f"{f'{k} steps':>18s}" for k in args.steps))
    for name in args.schedulers:
        cells = []
        for k in args.steps:
            try:
                x = run(name, k, mu=mu, s=s, noise=noise, spacing=args.spacing)
            except InputError:  # e.g. lcm: at most original_inference_steps (50) steps
                cells.append("n/a")
                continue
            x = x.astype(np.float64)
            if not np.isfinite(x).all():
                print(f"{name}: non-finite samples after {k} steps")
                return 1
            cells.append(f"{(x.mean() - mu) / s:+.3f} / {(x.std() - s) / s:+.3f}")
        print(f"{name:20s}" + "".join(f"{c:>18s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
