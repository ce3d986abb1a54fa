"""Statistics of the evaluation framework (docs SCIENCE.md), over long-format tables.

A long-format table has one row per subject, model and dataset with the metric value in one
column; :class:`Columns` names those columns. The functions here choose and call the library
implementations (scipy, pingouin, statsmodels, scikit-learn) and return plain numbers or tables:

- model comparison per dataset: Shapiro-Wilk and Levene pick a parametric path (repeated-measures
  ANOVA or paired t-test, post-hoc paired t-tests) or the non-parametric one (Friedman or Wilcoxon
  signed-rank, post-hoc Wilcoxon); post-hoc p-values are Benjamini-Hochberg corrected;
- agreement of each model with a reference (manual) measurement: ICC(3,1) or a subject-bootstrapped
  mixed-model ICC, Bland-Altman bias and limits of agreement with bootstrapped CIs, linear or
  Gaussian-process regression, Spearman's rho;
- the mixed-effects model of Dice on acquisition parameters with random-forest imputation and
  VIF screening.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pingouin as pg
import statsmodels.api as sm
from scipy import stats
from sklearn.ensemble import RandomForestRegressor
from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (makes IterativeImputer importable)
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, WhiteKernel
from sklearn.impute import IterativeImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from statsmodels.regression.mixed_linear_model import MixedLM
from statsmodels.stats.outliers_influence import variance_inflation_factor
from statsmodels.tools.sm_exceptions import ConvergenceWarning

ALPHA = 0.05
LOA_SD = 1.96  # Bland-Altman limits: mean +- 1.96 SD
LOA_PERCENTILES = (2.5, 97.5)  # non-parametric limits
N_BOOT = 10_000
VIF_THRESHOLD = 10.0
PATHS = ("auto", "parametric", "nonparametric")
PathChoice = Literal["auto", "parametric", "nonparametric"]


@dataclass(frozen=True)
class Columns:
    """Column names of a long-format table; ``model`` is the rater in agreement statistics."""

    subject: str = "subject"
    model: str = "model"
    dataset: str = "dataset"
    value: str = "value"


# --- assumptions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    shapiro_p: tuple[float, ...]
    levene_p: float
    parametric: bool


def check_assumptions(groups: Sequence[np.ndarray], alpha: float = ALPHA) -> Assumptions:
    """Shapiro-Wilk on every group and Levene across groups.

    The parametric path is taken only when no test rejects at ``alpha``; a NaN p-value (a
    constant group) counts as a rejection.
    """
    shapiro_p = tuple(float(stats.shapiro(group).pvalue) for group in groups)
    levene_p = float(stats.levene(*groups).pvalue)
    parametric = bool(min(shapiro_p) > alpha and levene_p > alpha)
    return Assumptions(shapiro_p, levene_p, parametric)


def _use_parametric(path: PathChoice, assumptions: Assumptions) -> bool:
    if path not in PATHS:
        raise ValueError(f"'path' must be one of {PATHS}, got {path!r}")
    return assumptions.parametric if path == "auto" else path == "parametric"


def _require_columns(data: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [name for name in names if name not in data.columns]
    if missing:
        raise ValueError(f"column(s) {missing} not in the table; it has {list(data.columns)}")


def _by_subject(frame: pd.DataFrame, columns: Columns, dataset: object) -> pd.DataFrame:
    """Subjects x models; a second value for the same subject and model is an error, not averaged."""
    if frame.duplicated([columns.subject, columns.model]).any():
        raise ValueError(f"dataset {dataset!r}: more than one {columns.value!r} per "
                         f"{columns.subject!r} and {columns.model!r}")
    return frame.pivot(index=columns.subject, columns=columns.model, values=columns.value)


# --- model comparison ------------------------------------------------------------------------


def compare_models(data: pd.DataFrame, columns: Columns = Columns(), alpha: float = ALPHA,
                   path: PathChoice = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Omnibus test across models and post-hoc pairs, per dataset.

    Parameters
    ----------
    data
        Long-format table, one value per subject, model and dataset.
    columns
        Its column names.
    alpha
        Level of the assumption checks and of the ``significant`` columns.
    path
        ``"auto"`` lets Shapiro-Wilk and Levene decide; ``"nonparametric"`` is the Friedman /
        Wilcoxon recipe of paper 1 regardless of the checks.

    Returns
    -------
    omnibus, pairwise
        One row per dataset (checks, the path taken, test, statistic, p) and one row per dataset and
        pair of models (uncorrected and Benjamini-Hochberg corrected p, within each dataset; the
        effect direction as the mean or median of ``model_a - model_b`` over subjects, following the
        test, and ``higher``, the model it favours, empty when it is 0).

    Raises
    ------
    ValueError
        A column is missing, a subject has two values for one model, or a dataset has fewer than
        two models or three subjects with values for every model.

    Note
    ----
    Only subjects with a value for every model of their dataset enter the tests (complete blocks);
    ``n_incomplete`` counts the others.
    """
    _require_columns(data, [columns.subject, columns.model, columns.dataset, columns.value])
    omnibus, pairwise = [], []
    for dataset, frame in data.groupby(columns.dataset, sort=True):
        wide = _by_subject(frame, columns, dataset)
        complete = wide.dropna()
        if complete.shape[1] < 2 or len(complete) < 3:
            raise ValueError(f"dataset {dataset!r}: needs at least 2 models and 3 subjects with "
                             f"values for all of them, has {complete.shape[1]} and {len(complete)}")
        if (complete.nunique(axis=1) == 1).all():
            # Every subject scores the same under every model: no test is defined, nothing differs.
            omnibus.append({columns.dataset: dataset, "n_subjects": len(complete),
                            "n_incomplete": len(wide) - len(complete), "n_models": complete.shape[1],
                            "test": "none: identical values", "p": float("nan"), "significant": False})
            continue
        assumptions = check_assumptions([complete[model].to_numpy() for model in complete], alpha)
        parametric = _use_parametric(path, assumptions)
        long = complete.reset_index().melt(id_vars=columns.subject, var_name=columns.model,
                                           value_name=columns.value)
        test, statistic, p = _omnibus(complete, long, columns, parametric)
        omnibus.append({
            columns.dataset: dataset, "n_subjects": len(complete), "n_incomplete": len(wide) - len(complete),
            "n_models": complete.shape[1], "shapiro_min_p": min(assumptions.shapiro_p),
            "levene_p": assumptions.levene_p, "path": "parametric" if parametric else "non-parametric",
            "test": test, "statistic": statistic, "p": p, "significant": p < alpha,
        })
        posthoc = pg.pairwise_tests(data=long, dv=columns.value, within=columns.model,
                                    subject=columns.subject, parametric=parametric, padjust="fdr_bh")
        statistic_column = "T" if parametric else "W_val"
        for row in posthoc.itertuples(index=False):
            row = row._asdict()
            # pingouin corrects nothing for a single pair, whose corrected p is its own
            corrected = float(row.get("p_corr", row["p_unc"]))
            difference, difference_of = _paired_difference(complete[row["A"]] - complete[row["B"]], parametric)
            pairwise.append({
                columns.dataset: dataset, "model_a": row["A"], "model_b": row["B"],
                "test": "paired t-test" if parametric else "Wilcoxon signed-rank",
                "statistic": float(row[statistic_column]), "p_unc": float(row["p_unc"]),
                "p_fdr_bh": corrected, "significant": corrected < alpha,
                "difference": difference, "difference_of": difference_of,
                "higher": row["A"] if difference > 0 else row["B"] if difference < 0 else "",
            })
    return pd.DataFrame(omnibus), pd.DataFrame(pairwise)


def _paired_difference(differences: pd.Series, parametric: bool) -> tuple[float, str]:
    """The effect of a pair as each path tests it: the mean (t-test) or median (Wilcoxon) of ``a - b``."""
    if parametric:
        return float(differences.mean()), "mean of a - b"
    return float(differences.median()), "median of a - b"


def _omnibus(wide: pd.DataFrame, long: pd.DataFrame, columns: Columns,
             parametric: bool) -> tuple[str, float, float]:
    if wide.shape[1] == 2:
        first, second = (wide[model].to_numpy() for model in wide)
        if parametric:
            result = pg.ttest(first, second, paired=True)
            return "paired t-test", float(result["T"].iloc[0]), float(result["p_val"].iloc[0])
        result = pg.wilcoxon(first, second)
        return "Wilcoxon signed-rank", float(result["W_val"].iloc[0]), float(result["p_val"].iloc[0])
    arguments = dict(data=long, dv=columns.value, within=columns.model, subject=columns.subject)
    if parametric:
        result = pg.rm_anova(**arguments)
        return "repeated-measures ANOVA", float(result["F"].iloc[0]), float(result["p_unc"].iloc[0])
    result = pg.friedman(**arguments)
    return "Friedman", float(result["Q"].iloc[0]), float(result["p_unc"].iloc[0])


# --- intraclass correlation ------------------------------------------------------------------


@dataclass(frozen=True)
class Icc:
    method: str
    icc: float
    ci_low: float
    ci_high: float
    median: float = float("nan")  # of the bootstrap distribution, where there is one
    n_unconverged: int = 0  # bootstrap fits left out because the optimiser did not converge


@contextlib.contextmanager
def _unrounded_pingouin_ci() -> Iterator[None]:
    # pingouin rounds CIs to 2 decimals by default: too coarse for ICCs of 0.99x
    previous = dict(pg.options)
    pg.options["round.column.CI95"] = None
    try:
        yield
    finally:
        pg.options.clear()
        pg.options.update(previous)


def icc_3_1(data: pd.DataFrame, columns: Columns = Columns()) -> Icc:
    """ICC(3,1): two-way mixed effects, consistency, single rater (Shrout & Fleiss).

    pingouin names it ``ICC(C,1)`` (McGraw & Wong notation); the raters are ``columns.model``,
    the targets ``columns.subject``. Needs complete, balanced data.
    """
    with _unrounded_pingouin_ci():
        table = pg.intraclass_corr(data=data, targets=columns.subject, raters=columns.model,
                                   ratings=columns.value).set_index("Type")
    low, high = table.at["ICC(C,1)", "CI95"]
    return Icc("ICC(3,1)", float(table.at["ICC(C,1)", "ICC"]), float(low), float(high))


def _mixed_icc(values: np.ndarray, raters: np.ndarray, subjects: np.ndarray) -> tuple[float, bool]:
    frame = pd.DataFrame({"value": values, "rater": raters})
    fit = MixedLM.from_formula("value ~ C(rater)", groups=subjects, data=frame).fit(reml=True)
    between = float(fit.cov_re.iloc[0, 0])
    return between / (between + float(fit.scale)), bool(fit.converged)


def mixed_model_icc(data: pd.DataFrame, columns: Columns = Columns()) -> float:
    """ICC from a linear mixed model: between-subject variance / (between-subject + residual).

    A random intercept per subject, and the rater as a fixed effect so that a constant offset
    between raters is not counted as disagreement (as in ICC(3,1), which it equals on balanced
    data). Unlike the ANOVA ICC it accepts repeated or missing measurements per subject.
    """
    icc, _ = _mixed_icc(data[columns.value].to_numpy(float), data[columns.model].to_numpy(),
                        data[columns.subject].to_numpy())
    return icc


def bootstrap_mixed_icc(data: pd.DataFrame, columns: Columns = Columns(), n_boot: int = N_BOOT,
                        seed: int = 0) -> Icc:
    """Mixed-model ICC with a CI from resampling subjects with replacement.

    Returns the estimate on all data, the median and the 2.5/97.5 percentiles of ``n_boot``
    resamples (SCIENCE.md: 10,000). Each drawn subject keeps all its rows and becomes its own
    cluster, also when drawn twice. The same ``seed`` gives the same interval.
    """
    values = data[columns.value].to_numpy(float)
    raters = data[columns.model].to_numpy()
    subjects = data[columns.subject].to_numpy()
    rows_of_subject = list(data.reset_index(drop=True).groupby(columns.subject, sort=True).indices.values())
    rng = np.random.default_rng(seed)
    estimates = []
    with warnings.catch_warnings():
        # resamples often put a variance on the boundary; the warning repeats for every fit
        warnings.simplefilter("ignore", ConvergenceWarning)
        icc, _ = _mixed_icc(values, raters, subjects)
        for _ in range(n_boot):
            drawn = rng.integers(len(rows_of_subject), size=len(rows_of_subject))
            rows = np.concatenate([rows_of_subject[index] for index in drawn])
            clusters = np.repeat(np.arange(len(drawn)), [len(rows_of_subject[index]) for index in drawn])
            estimate, converged = _mixed_icc(values[rows], raters[rows], clusters)
            if converged:
                estimates.append(estimate)
    if not estimates:
        raise ValueError("no bootstrap fit of the mixed model converged")
    low, high = np.percentile(estimates, [2.5, 97.5])
    return Icc("mixed-model bootstrap", icc, float(low), float(high), float(np.median(estimates)),
               n_boot - len(estimates))


# --- Bland-Altman ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BlandAltman:
    """Bias and limits of agreement of ``candidate - reference``, each with a bootstrap CI."""

    method: str
    bias: float
    loa_low: float
    loa_high: float
    bias_ci: tuple[float, float]
    loa_low_ci: tuple[float, float]
    loa_high_ci: tuple[float, float]


def _mean_sd_limits(differences: np.ndarray, axis: int = -1) -> np.ndarray:
    bias = np.mean(differences, axis=axis)
    spread = LOA_SD * np.std(differences, ddof=1, axis=axis)
    return np.stack([bias, bias - spread, bias + spread])


def _percentile_limits(differences: np.ndarray, axis: int = -1) -> np.ndarray:
    low, high = np.percentile(differences, LOA_PERCENTILES, axis=axis)
    return np.stack([np.median(differences, axis=axis), low, high])


def bland_altman(reference: np.ndarray, candidate: np.ndarray, parametric: bool = True,
                 n_boot: int = N_BOOT, seed: int = 0, confidence: float = 0.95) -> BlandAltman:
    """Bland-Altman agreement of paired measurements.

    Parametric: bias = mean difference, limits = bias +- 1.96 SD (ddof 1). Non-parametric:
    bias = median difference, limits = 2.5th and 97.5th percentiles. CIs are percentile
    bootstraps over the pairs (``scipy.stats.bootstrap``), reproducible by ``seed``.
    """
    differences = np.asarray(candidate, dtype=float) - np.asarray(reference, dtype=float)
    if differences.ndim != 1 or len(differences) < 3:
        raise ValueError(f"'reference' and 'candidate' must be paired 1-D arrays of 3 or more values, "
                         f"got shape {differences.shape}")
    limits = _mean_sd_limits if parametric else _percentile_limits
    bias, low, high = limits(differences)
    interval = stats.bootstrap((differences,), limits, n_resamples=n_boot, confidence_level=confidence,
                               method="percentile", vectorized=True, rng=seed).confidence_interval
    ci = [(float(lo), float(hi)) for lo, hi in zip(interval.low, interval.high)]
    method = "mean +- 1.96 SD" if parametric else "median, 2.5/97.5 percentiles"
    return BlandAltman(method, float(bias), float(low), float(high), ci[0], ci[1], ci[2])


# --- regression and correlation --------------------------------------------------------------


@dataclass(frozen=True)
class RegressionFit:
    method: str
    r2: float
    slope: float  # NaN for Gaussian-process regression
    intercept: float
    predict: Callable[[np.ndarray], np.ndarray]


def linear_regression(x: np.ndarray, y: np.ndarray) -> RegressionFit:
    """Ordinary least squares of ``y`` on ``x`` (statsmodels): R2, slope, intercept."""
    fit = sm.OLS(np.asarray(y, dtype=float), sm.add_constant(np.asarray(x, dtype=float))).fit()
    intercept, slope = fit.params

    def predict(new_x: np.ndarray) -> np.ndarray:
        return fit.predict(sm.add_constant(np.asarray(new_x, dtype=float), has_constant="add"))

    return RegressionFit("linear", float(fit.rsquared), float(slope), float(intercept), predict)


def gaussian_process_regression(x: np.ndarray, y: np.ndarray, seed: int = 0) -> RegressionFit:
    """Gaussian-process regression of ``y`` on ``x`` with an RBF + white-noise kernel; in-sample R2.

    ``x`` is standardised so that the RBF length scale starts at a sensible size whatever the
    unit (mm, ms, cm3).
    """
    model = make_pipeline(StandardScaler(), GaussianProcessRegressor(
        kernel=RBF() + WhiteKernel(), normalize_y=True, random_state=seed))
    features = np.asarray(x, dtype=float).reshape(-1, 1)
    model.fit(features, np.asarray(y, dtype=float))

    def predict(new_x: np.ndarray) -> np.ndarray:
        return model.predict(np.asarray(new_x, dtype=float).reshape(-1, 1))

    r2 = float(model.score(features, np.asarray(y, dtype=float)))
    return RegressionFit("gaussian process", r2, float("nan"), float("nan"), predict)


# --- agreement with a reference --------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """One model against the reference on one dataset; the path decides which statistics."""

    dataset: object
    model: object
    pairs: pd.DataFrame  # index subject; columns "reference", "candidate"
    assumptions: Assumptions
    parametric: bool
    icc: Icc
    bland_altman: BlandAltman
    regression: RegressionFit
    spearman_rho: float
    spearman_p: float

    def row(self, columns: Columns) -> dict[str, object]:
        ba = self.bland_altman
        return {
            columns.dataset: self.dataset, columns.model: self.model, "n_subjects": len(self.pairs),
            "shapiro_p_reference": self.assumptions.shapiro_p[0],
            "shapiro_p_candidate": self.assumptions.shapiro_p[1], "levene_p": self.assumptions.levene_p,
            "path": "parametric" if self.parametric else "non-parametric",
            "icc_method": self.icc.method, "icc": self.icc.icc, "icc_median": self.icc.median,
            "icc_ci_low": self.icc.ci_low, "icc_ci_high": self.icc.ci_high,
            "icc_boot_unconverged": self.icc.n_unconverged,
            "ba_method": ba.method, "bias": ba.bias, "bias_ci_low": ba.bias_ci[0], "bias_ci_high": ba.bias_ci[1],
            "loa_low": ba.loa_low, "loa_low_ci_low": ba.loa_low_ci[0], "loa_low_ci_high": ba.loa_low_ci[1],
            "loa_high": ba.loa_high, "loa_high_ci_low": ba.loa_high_ci[0], "loa_high_ci_high": ba.loa_high_ci[1],
            "regression": self.regression.method, "r2": self.regression.r2, "slope": self.regression.slope,
            "intercept": self.regression.intercept, "spearman_rho": self.spearman_rho,
            "spearman_p": self.spearman_p,
        }


def agreement(data: pd.DataFrame, reference: str, columns: Columns = Columns(), alpha: float = ALPHA,
              path: PathChoice = "auto", n_boot: int = N_BOOT, seed: int = 0) -> list[Agreement]:
    """Agreement of every model with the ``reference`` model (e.g. manual masks), per dataset.

    Shapiro-Wilk on both measurements and Levene between them choose the path (SCIENCE.md):
    parametric gives ICC(3,1), Bland-Altman mean +- 1.96 SD and linear regression; non-parametric
    gives the bootstrapped mixed-model ICC, percentile Bland-Altman and Gaussian-process
    regression. Spearman's rho is always reported. Subjects without both values are left out.

    Raises
    ------
    ValueError
        A column is missing, the reference is absent from a dataset, a subject has two values for
        one model, or fewer than 3 subjects are paired.
    """
    _require_columns(data, [columns.subject, columns.model, columns.dataset, columns.value])
    results = []
    for dataset, frame in data.groupby(columns.dataset, sort=True):
        wide = _by_subject(frame, columns, dataset)
        if reference not in wide.columns:
            raise ValueError(f"dataset {dataset!r}: reference {reference!r} not among the "
                             f"{columns.model!r} values {list(wide.columns)}")
        for model in (name for name in wide.columns if name != reference):
            pairs = wide[[reference, model]].dropna().set_axis(["reference", "candidate"], axis=1)
            if len(pairs) < 3:
                raise ValueError(f"dataset {dataset!r}, model {model!r}: {len(pairs)} subjects paired "
                                 f"with {reference!r}, need at least 3")
            results.append(_agree(dataset, model, pairs, columns, alpha, path, n_boot, seed))
    return results


def _agree(dataset: object, model: object, pairs: pd.DataFrame, columns: Columns, alpha: float,
           path: PathChoice, n_boot: int, seed: int) -> Agreement:
    reference, candidate = pairs["reference"].to_numpy(float), pairs["candidate"].to_numpy(float)
    assumptions = check_assumptions([reference, candidate], alpha)
    parametric = _use_parametric(path, assumptions)
    long = pairs.rename_axis(columns.subject).reset_index().melt(
        id_vars=columns.subject, var_name=columns.model, value_name=columns.value)
    if parametric:
        icc = icc_3_1(long, columns)
        regression = linear_regression(reference, candidate)
    else:
        icc = bootstrap_mixed_icc(long, columns, n_boot=n_boot, seed=seed)
        regression = gaussian_process_regression(reference, candidate, seed=seed)
    ba = bland_altman(reference, candidate, parametric=parametric, n_boot=n_boot, seed=seed)
    spearman = stats.spearmanr(reference, candidate)
    return Agreement(dataset, model, pairs, assumptions, parametric, icc, ba, regression,
                     float(spearman.statistic), float(spearman.pvalue))


def agreement_table(results: Sequence[Agreement], columns: Columns = Columns()) -> pd.DataFrame:
    return pd.DataFrame([result.row(columns) for result in results])


# --- mixed-effects model of Dice on acquisition parameters -----------------------------------


def impute_random_forest(predictors: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Fill missing numeric predictors by iterative random-forest regression on the others."""
    imputer = IterativeImputer(estimator=RandomForestRegressor(n_estimators=100, random_state=seed),
                               random_state=seed)
    return pd.DataFrame(imputer.fit_transform(predictors), index=predictors.index, columns=predictors.columns)


def screen_vif(predictors: pd.DataFrame, threshold: float = VIF_THRESHOLD) -> tuple[list[str], pd.DataFrame]:
    """Drop the predictor with the largest VIF while that VIF exceeds ``threshold``.

    One at a time, because every drop changes the others' VIFs. VIFs are computed with an
    intercept in the design. Returns the kept predictors and a table of every predictor's VIF:
    at the moment it was dropped, or in the final set.

    Raises
    ------
    ValueError
        ``threshold`` is not above 1, or a predictor is constant (it duplicates the intercept).
    """
    if threshold <= 1:
        raise ValueError(f"'threshold' must be above 1 (the smallest possible VIF), got {threshold}")
    constant = [name for name in predictors if predictors[name].nunique() < 2]
    if constant:
        raise ValueError(f"predictor(s) {constant} are constant")
    # VIFs do not depend on units; z-scores keep ms, mm and degrees from ill-conditioning the design
    scaled = (predictors - predictors.mean()) / predictors.std()
    kept, rows = list(predictors.columns), []
    while kept:
        design = sm.add_constant(scaled[kept].to_numpy(float), has_constant="add")
        # collinearity is what is measured here and removed: an infinite VIF is dropped first, and
        # statsmodels' warning about the ill-conditioned design says nothing new
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The design matrix is poorly conditioned")
            vifs = [variance_inflation_factor(design, i + 1) for i in range(len(kept))]
        worst = int(np.argmax(vifs))
        if vifs[worst] <= threshold:
            rows += [{"predictor": name, "vif": vif, "dropped": False} for name, vif in zip(kept, vifs)]
            break
        rows.append({"predictor": kept.pop(worst), "vif": vifs[worst], "dropped": True})
    return kept, pd.DataFrame(rows, columns=["predictor", "vif", "dropped"])


@dataclass(frozen=True)
class MixedModelResult:
    coefficients: pd.DataFrame  # fixed effects, then variance components
    vif: pd.DataFrame
    dropped: list[str]
    random_effects: str
    n_imputed: int
    converged: bool


def dice_mixed_model(data: pd.DataFrame, predictors: Sequence[str], columns: Columns = Columns(),
                     vif_threshold: float = VIF_THRESHOLD, seed: int = 0) -> MixedModelResult:
    """Hierarchical mixed-effects model of ``columns.value`` (mean Dice) on acquisition parameters.

    Numeric predictors with missing values are imputed by random forests; other predictors (e.g.
    2D/3D, model) are dummy coded against their first level; then VIF screening drops predictors
    above ``vif_threshold`` (SCIENCE.md: 10). The model has a random intercept per dataset and,
    when a subject has several rows (several models or labels), a random intercept per subject
    nested in its dataset. Fit by REML (statsmodels MixedLM).

    Raises
    ------
    ValueError
        A column is missing, the outcome or the dataset is missing on some row, a non-numeric
        predictor has missing values, or VIF screening leaves no predictor.
    """
    predictors = list(predictors)
    _require_columns(data, [columns.value, columns.dataset, columns.subject, *predictors])
    if not predictors:
        raise ValueError("'predictors' must name at least one column")
    for name in (columns.value, columns.dataset):
        if data[name].isna().any():
            raise ValueError(f"column {name!r} has missing values")
    numeric = [name for name in predictors if pd.api.types.is_numeric_dtype(data[name])]
    categorical = [name for name in predictors if name not in numeric]
    for name in categorical:
        if data[name].isna().any():
            raise ValueError(f"non-numeric predictor {name!r} has missing values; only numeric ones are imputed")
    values = data[numeric].astype(float)
    n_imputed = int(values.isna().sum().sum())
    if n_imputed:
        values = impute_random_forest(values, seed)
    if categorical:
        values = values.join(pd.get_dummies(data[categorical].astype(str), drop_first=True, dtype=float))
    kept, vif = screen_vif(values, vif_threshold)
    if not kept:
        raise ValueError(f"VIF screening at {vif_threshold} left no predictor")
    # formula terms use stand-in names so that any column name works
    stand_ins = {f"x{i}": name for i, name in enumerate(kept)}
    frame = values[kept].set_axis(list(stand_ins), axis=1).assign(
        outcome=data[columns.value].to_numpy(float), subject=data[columns.subject].to_numpy())
    formula = "outcome ~ " + " + ".join(stand_ins)
    nested = bool(data.duplicated([columns.dataset, columns.subject]).any())
    vc_formula = {"subject": "0 + C(subject)"} if nested else None
    fit = MixedLM.from_formula(formula, groups=data[columns.dataset].to_numpy(), re_formula="1",
                               vc_formula=vc_formula, data=frame).fit(reml=True)
    intervals = fit.conf_int().loc[fit.fe_params.index]
    coefficients = pd.DataFrame({
        "term": [stand_ins.get(term, term) for term in fit.fe_params.index], "kind": "fixed",
        "estimate": fit.fe_params.to_numpy(), "std_error": fit.bse_fe.to_numpy(),
        "z": fit.tvalues.loc[fit.fe_params.index].to_numpy(), "p": fit.pvalues.loc[fit.fe_params.index].to_numpy(),
        "ci_low": intervals[0].to_numpy(), "ci_high": intervals[1].to_numpy(),
    })
    variances = {f"{columns.dataset} (random intercept)": float(fit.cov_re.iloc[0, 0])}
    if nested:
        variances[f"{columns.subject} within {columns.dataset} (random intercept)"] = float(fit.vcomp[0])
    variances["residual"] = float(fit.scale)
    coefficients = pd.concat([coefficients, pd.DataFrame(
        {"term": list(variances), "kind": "variance", "estimate": list(variances.values())})], ignore_index=True)
    random_effects = f"{columns.dataset}/{columns.subject}" if nested else columns.dataset
    dropped = vif.loc[vif["dropped"], "predictor"].tolist()
    return MixedModelResult(coefficients, vif, dropped, random_effects, n_imputed, bool(fit.converged))
