"""Subjects, traits, families, sites and the true connectivity fingerprint of each subject.

In: a :class:`CohortConfig` and a ``np.random.Generator``.
Out: a :class:`Cohort`: a participants table (subject, sex, age, fluid_iq, family_id, site) and
per-subject true node correlation matrices ``corr (S, K, K)`` over the network nodes of
``maps.network_nodes()``. In Fisher-z space each subject's connectome is

    z_s = z_group + sum_k beta_k * trait_k(s) * E_k + family_scale * F_family(s) + idio_scale * I_s

where E_k marks the edges between two named Yeo-7 networks, F is shared by siblings and I_s
is the subject's own, stable-across-sessions part. tanh(z) is then projected to the nearest
valid correlation matrix (eigenvalues floored), which is the stored ground truth.
Effect sizes come from published HCP figures (``DEFAULT_EFFECTS``); ``ActivationEffect``s are a
trait's first-order expression, in the amplitude of task maps (applied in ``generate``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fmri_bench.synth.maps import Nodes

# Group-level Fisher-z coupling between Yeo-7 networks (symmetric; unlisted pairs: 0.05).
_NET_COUPLING = {
    ("Default", "Dorsal Attention"): -0.25, ("Default", "Ventral Attention"): -0.15,
    ("Default", "Somatomotor"): -0.05, ("Default", "Frontoparietal"): 0.2, ("Default", "Limbic"): 0.2,
    ("Frontoparietal", "Dorsal Attention"): 0.2, ("Frontoparietal", "Ventral Attention"): 0.2,
    ("Visual", "Somatomotor"): 0.15, ("Visual", "Dorsal Attention"): 0.25,
    ("Somatomotor", "Ventral Attention"): 0.3, ("Dorsal Attention", "Ventral Attention"): 0.2,
}


@dataclass(frozen=True)
class TraitEffect:
    """A trait's effect on the connectome: ``beta`` Fisher-z per unit trait on the edges
    between Yeo-7 networks ``net_a`` and ``net_b`` (within-network when equal).

    Traits enter standardised: fluid_iq and age as z-scores, sex as -0.5 (F) / +0.5 (M), so
    beta is the z difference per SD (or between sexes). Instead of ``beta`` an effect may give
    ``d``: one unit of trait moves the subject's mean true z over those edges by ``d`` times its
    between-subject SD from the other sources (idiosyncratic and family parts), i.e. Cohen's d
    for sex and d / sqrt(1 + d^2) = Pearson r for a standardised trait; ``beta`` then follows
    from the cohort's ``idio_scale``, ``family_scale`` and the number of edges.
    """

    trait: str
    net_a: str
    net_b: str
    beta: float | None = None
    d: float | None = None
    source: str = ""


@dataclass(frozen=True)
class ActivationEffect:
    """A trait's first-order effect: the amplitude of the task conditions ``paradigm`` /
    ``condition`` (a prefix, e.g. "2bk") correlates ``r`` with the standardised trait across
    subjects (on top of the between-subject amplitude SD ``Profile.gain_sd``)."""

    trait: str
    paradigm: str
    condition: str
    r: float
    source: str = ""


# Sized from published HCP effect sizes; the sizes hold for the true values, so what an analysis
# of the simulated (noisy, finite) data can reach is below the published figure, never above.
# - fluid_iq: network-level RSFC vs cognitive ability r = 0.11 in HCP (n = 844, dorsal attention
#   network; Marek et al. 2022 Nature, Extended Data Fig. 3d).
# - sex: 87 % sex prediction from multi-run HCP rfMRI FC (Zhang et al. 2018 Hum Brain Mapp,
#   820 subjects), with males higher in sensorimotor and females higher in default-mode FC
#   (Ritchie et al. 2018 Cereb Cortex; Zhang et al. 2018 name DMN and sensorimotor FC among the
#   most predictive): two equal effects whose combined Mahalanobis distance D gives a
#   Bayes-optimal accuracy Phi(D / 2) = 0.87 on the true connectomes: D = 2.25, d = D / sqrt(2).
# - age: none. HCP young adults span 22-36 y, and no published HCP-YA age-FC effect size is
#   used here; the age benchmark's expected result on this cohort is chance.
_SEX_D = 2.25 / np.sqrt(2.0)
DEFAULT_EFFECTS = (
    TraitEffect("fluid_iq", "Dorsal Attention", "Dorsal Attention", d=0.11 / np.sqrt(1 - 0.11**2),
                source="Marek et al. 2022 Nature Extended Data Fig. 3d (HCP, r = 0.11)"),
    TraitEffect("sex", "Somatomotor", "Somatomotor", d=_SEX_D,
                source="Zhang et al. 2018 Hum Brain Mapp (87 % from HCP FC); direction Ritchie et al. 2018"),
    TraitEffect("sex", "Default", "Default", d=-_SEX_D,
                source="Zhang et al. 2018 Hum Brain Mapp (87 % from HCP FC); direction Ritchie et al. 2018"),
)
# The working-memory (2-back) activation vs cognitive ability in HCP: r = 0.34, of which r = 0.14
# remains once WM task accuracy is regressed out (Marek et al. 2022 Nature, Extended Data Fig. 3a,
# c; n = 844). The simulation has no task performance, so the smaller, residual figure is used.
DEFAULT_ACTIVATION_EFFECTS = (
    ActivationEffect("fluid_iq", "WM", "2bk", 0.14,
                     source="Marek et al. 2022 Nature Extended Data Fig. 3c (HCP, r = 0.14)"),
)


@dataclass
class CohortConfig:
    """Cohort size, site mix, family structure and the fingerprint components (Fisher z SDs)."""

    n_subjects: int = 8
    n_site_b: int = 2  # subjects scanned at the second (out-of-distribution) site
    sibling_prob: float = 0.5  # chance that a new family has 2 (else 1) members; 3 when 0.15 more
    idio_scale: float = 0.12  # SD of the subject's own edge deviations (see Profile.idio_scale)
    family_scale: float = 0.08  # SD of the deviations shared by siblings (see Profile.family_scale)
    iq_heritability: float = 0.5  # share of fluid_iq variance shared within a family
    effects: tuple[TraitEffect, ...] = DEFAULT_EFFECTS
    min_eig: float = 0.05  # eigenvalue floor of the true correlation matrices


@dataclass
class Cohort:
    participants: pd.DataFrame
    corr: np.ndarray  # (S, K, K) float64, true node correlations
    z_group: np.ndarray  # (K, K) Fisher z group template
    edge_masks: dict[str, np.ndarray] = field(default_factory=dict)  # effect name -> (K, K) bool
    betas: dict[str, float] = field(default_factory=dict)  # effect name -> Fisher z per unit trait


def effect_name(e: TraitEffect) -> str:
    return f"{e.trait}:{e.net_a}-{e.net_b}"


def effect_beta(e: TraitEffect, mask: np.ndarray, idio_scale: float, family_scale: float) -> float:
    """Fisher z per unit trait of an effect: ``beta``, or ``d`` times the between-subject SD of
    the mean of the ``mask`` edges from the idiosyncratic and family parts (independent per edge)."""
    if (e.beta is None) == (e.d is None):
        raise ValueError(f"trait effect {effect_name(e)}: give exactly one of beta and d")
    if e.beta is not None:
        return float(e.beta)
    n_edges = max(int(mask.sum() // 2), 1)
    return float(e.d) * float(np.sqrt((idio_scale**2 + family_scale**2) / n_edges))


def edge_mask(nodes: Nodes, net_a: str, net_b: str) -> np.ndarray:
    """(K, K) bool, True on edges between a node of net_a and a node of net_b (no diagonal)."""
    n7 = np.array(nodes.network7)
    if net_a not in n7 or net_b not in n7:
        raise ValueError(f"unknown Yeo-7 network in ({net_a!r}, {net_b!r}); known: {sorted(set(n7))}")
    m = np.outer(n7 == net_a, n7 == net_b)
    m = m | m.T
    np.fill_diagonal(m, False)
    return m


def group_template(nodes: Nodes, scale: float = 0.6) -> np.ndarray:
    """Group Fisher-z connectome (K, K): strong homotopic and within-network coupling.

    ``scale`` shrinks the coupling table so that tanh(z) stays positive definite (at 1.0 the
    many within-network blocks and anticorrelations make it indefinite).
    """
    k = nodes.n
    net17 = np.array([n.split("_")[1] for n in nodes.names])
    n7 = np.array(nodes.network7)
    z = np.full((k, k), 0.05)
    for (a, b), v in _NET_COUPLING.items():
        m = np.outer(n7 == a, n7 == b)
        z[m | m.T] = v
    z[np.equal.outer(n7, n7)] = 0.5
    same_hemi = np.equal.outer(nodes.hemi, nodes.hemi)
    z[~same_hemi] -= 0.08
    z[np.equal.outer(net17, net17) & ~same_hemi] = 0.8  # homotopic pairs
    jitter = np.random.default_rng(12345).normal(0, 0.05, (k, k))  # fixed: part of the template
    z += np.triu(jitter, 1) + np.triu(jitter, 1).T
    np.fill_diagonal(z, 0.0)
    return scale * z


def nearest_corr(c: np.ndarray, min_eig: float) -> np.ndarray:
    """Floor the eigenvalues of a symmetric matrix and rescale to unit diagonal."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    c = (v * np.maximum(w, min_eig)) @ v.T
    d = np.sqrt(np.diag(c))
    c = c / np.outer(d, d)
    np.fill_diagonal(c, 1.0)
    return c


def _sym_noise(rng: np.random.Generator, k: int) -> np.ndarray:
    a = np.triu(rng.standard_normal((k, k)), 1)
    return a + a.T


def make_participants(cfg: CohortConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Subjects grouped into families; site B for the last ``n_site_b`` families' members."""
    fam_sizes, n = [], 0
    while n < cfg.n_subjects:
        u = rng.random()
        size = 3 if u < 0.15 * cfg.sibling_prob else (2 if u < cfg.sibling_prob else 1)
        size = min(size, cfg.n_subjects - n)
        fam_sizes.append(size)
        n += size
    fam_iq = rng.standard_normal(len(fam_sizes))
    sexes = rng.permutation(np.array(["M", "F"] * (cfg.n_subjects // 2 + 1))[:cfg.n_subjects])
    rows, i = [], 0
    for f, size in enumerate(fam_sizes):
        for _ in range(size):
            rows.append({
                "subject": f"{100100 + 7 * i:06d}",
                "sex": str(sexes[i]),
                "age": round(float(rng.uniform(22, 36)), 1),
                "fluid_iq": round(float(np.sqrt(cfg.iq_heritability) * fam_iq[f]
                                        + np.sqrt(1 - cfg.iq_heritability) * rng.standard_normal()), 3),
                "family_id": f"F{f + 1:04d}",
            })
            i += 1
    df = pd.DataFrame(rows)
    # site B: whole families from the end, so a family never spans two sites
    site = np.array(["A"] * len(df), dtype=object)
    n_b, fams = 0, list(df.family_id.unique())
    while n_b < cfg.n_site_b and fams:
        fam = fams.pop()
        sel = (df.family_id == fam).to_numpy()
        site[sel] = "B"
        n_b += int(sel.sum())
    df["site"] = site
    return df


def standardized_traits(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Traits as they enter the connectome: z-scored age / fluid_iq, sex -0.5 (F) / +0.5 (M).

    Age is standardised with fixed population values (HCP-YA range 22-36 y), not the sample's,
    so a subject's truth does not depend on who else is in the cohort.
    """
    return {
        "sex": np.where(df.sex.to_numpy() == "M", 0.5, -0.5),
        "age": (df.age.to_numpy(float) - 29.0) / 4.0,
        "fluid_iq": df.fluid_iq.to_numpy(float),
    }


def make_cohort(cfg: CohortConfig, nodes: Nodes, rng: np.random.Generator) -> Cohort:
    df = make_participants(cfg, rng)
    k = nodes.n
    z_group = group_template(nodes)
    traits = standardized_traits(df)
    masks = {effect_name(e): edge_mask(nodes, e.net_a, e.net_b) for e in cfg.effects}
    betas = {effect_name(e): effect_beta(e, masks[effect_name(e)], cfg.idio_scale, cfg.family_scale)
             for e in cfg.effects}
    fam_dev = {f: _sym_noise(rng, k) for f in df.family_id.unique()}
    corr = np.empty((len(df), k, k))
    for s in range(len(df)):
        z = z_group.copy()
        for e in cfg.effects:
            z += betas[effect_name(e)] * traits[e.trait][s] * masks[effect_name(e)]
        z += cfg.family_scale * fam_dev[df.family_id.iloc[s]] + cfg.idio_scale * _sym_noise(rng, k)
        c = np.tanh(z)
        np.fill_diagonal(c, 1.0)
        corr[s] = nearest_corr(c, cfg.min_eig)
    return Cohort(df, corr, z_group, masks, betas)
