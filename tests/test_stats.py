"""msk-eval statistics against the libraries they wrap, published example values and known truths."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
import statsmodels.api as sm
import yaml
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.outliers_influence import variance_inflation_factor

from msk_node_evaluation import cli, stats
from msk_node_evaluation.stats import Columns

WINES = Columns(subject="Wine", model="Judge", value="Scores")


def _long(wide: pd.DataFrame, dataset: str = "knee") -> pd.DataFrame:
    """Subjects x models -> the long format of the framework."""
    return (wide.rename_axis("subject").reset_index()
            .melt(id_vars="subject", var_name="model", value_name="value").assign(dataset=dataset))


@pytest.fixture
def weeks() -> pd.DataFrame:
    """pingouin's 'rm_anova_wide' (scores at 4 time points), subjects with a missing value removed."""
    return pg.read_dataset("rm_anova_wide").dropna().reset_index(drop=True)


def _biomarkers(seed: int = 0, n: int = 25) -> pd.DataFrame:
    """Manual and two model measurements of a biomarker per subject, two datasets."""
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, centre in [("knee", 2.0), ("thigh", 300.0)]:
        truth = rng.normal(centre, centre * 0.2, n)
        for model, bias, noise in [("manual", 0.0, 0.02), ("sam", 0.05, 0.08), ("sam2", -0.02, 0.05)]:
            measured = truth * (1 + bias) + rng.normal(0, centre * noise, n)
            rows += [{"subject": f"s{i:02d}", "model": model, "dataset": dataset, "value": v}
                     for i, v in enumerate(measured)]
    return pd.DataFrame(rows)


def _segmentation_runs(seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Dice of three models on subjects of 8 datasets with known acquisition effects."""
    effects = {"echo_time": -0.004, "flip_angle": 0.002}
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(8):
        dataset_shift = rng.normal(0, 0.03)
        for s in range(12):
            subject_shift = rng.normal(0, 0.02)
            echo_time, flip_angle = rng.uniform(5, 40), rng.uniform(5, 90)
            for m, model in enumerate(["medsam", "sam", "sam2"]):
                dice = (0.75 + effects["echo_time"] * echo_time + effects["flip_angle"] * flip_angle
                        + 0.03 * m + dataset_shift + subject_shift + rng.normal(0, 0.01))
                rows.append({"subject": f"s{s:02d}", "model": model, "dataset": f"set{d}", "dice": dice,
                             "echo_time": echo_time, "flip_angle": flip_angle,
                             # the same information in other units: must be screened out
                             "echo_time_us": echo_time * 1000 + rng.normal(0, 1),
                             "acquisition": "3D" if d % 2 else "2D"})
    return pd.DataFrame(rows), effects


# --- model comparison ------------------------------------------------------------------------


def test_parametric_path_reproduces_published_rm_anova(weeks):
    # pingouin documentation, rm_anova on 'rm_anova_wide': F(3, 24) = 5.200652, p = 0.006557
    omnibus, pairwise = stats.compare_models(_long(weeks), path="parametric")
    row = omnibus.iloc[0]
    assert row["test"] == "repeated-measures ANOVA"
    # the paired t-tests give the direction as the mean difference
    means = [(weeks[pair.model_a] - weeks[pair.model_b]).mean() for pair in pairwise.itertuples()]
    np.testing.assert_allclose(pairwise["difference"], means)
    assert pairwise["higher"].tolist() == [pair.model_a if mean > 0 else pair.model_b
                                           for pair, mean in zip(pairwise.itertuples(), means)]
    assert row["statistic"] == pytest.approx(5.200652, abs=1e-6)
    assert row["p"] == pytest.approx(0.006557, abs=1e-6)
    assert row["n_subjects"] == 9 and row["n_models"] == 4


def test_auto_path_records_shapiro_and_levene(weeks):
    omnibus, _ = stats.compare_models(_long(weeks), path="auto")
    row = omnibus.iloc[0]
    shapiro = min(scipy_stats.shapiro(weeks[column]).pvalue for column in weeks)
    assert row["shapiro_min_p"] == pytest.approx(shapiro)
    assert row["levene_p"] == pytest.approx(scipy_stats.levene(*weeks.to_numpy().T).pvalue)
    assert row["path"] == ("parametric" if min(shapiro, row["levene_p"]) > 0.05 else "non-parametric")


def test_friedman_and_posthoc_wilcoxon_match_scipy_and_pingouin(weeks):
    omnibus, pairwise = stats.compare_models(_long(weeks), path="nonparametric")
    friedman = scipy_stats.friedmanchisquare(*weeks.to_numpy().T)
    assert omnibus.iloc[0]["test"] == "Friedman"
    assert omnibus.iloc[0]["statistic"] == pytest.approx(friedman.statistic)
    assert omnibus.iloc[0]["p"] == pytest.approx(friedman.pvalue)
    assert omnibus.iloc[0]["p"] == pytest.approx(pg.friedman(weeks)["p_unc"].iloc[0])

    assert len(pairwise) == 6
    for row in pairwise.itertuples():
        reference = scipy_stats.wilcoxon(weeks[row.model_a], weeks[row.model_b])
        assert row.statistic == pytest.approx(reference.statistic)
        assert row.p_unc == pytest.approx(reference.pvalue)
        assert row.p_unc == pytest.approx(pg.wilcoxon(weeks[row.model_a], weeks[row.model_b])["p_val"].iloc[0])
    corrected = multipletests(pairwise["p_unc"], method="fdr_bh")[1]
    np.testing.assert_allclose(pairwise["p_fdr_bh"], corrected)
    assert (pairwise["significant"] == (corrected < 0.05)).all()


def test_a_small_dice_table_gives_scipy_friedman_wilcoxon_and_statsmodels_bh():
    # subject mean Dice of three models on eight subjects; paired differences have no ties, so the
    # Wilcoxon p-values are exact: sam2 beats both on all subjects, sam beats medsam on all but s4 and s6
    dice = pd.DataFrame({
        "medsam": [0.51, 0.62, 0.49, 0.55, 0.64, 0.47, 0.70, 0.57],
        "sam": [0.70, 0.74, 0.69, 0.72, 0.61, 0.73, 0.68, 0.71],
        "sam2": [0.80, 0.78, 0.77, 0.85, 0.66, 0.82, 0.83, 0.74],
    }, index=[f"s{i}" for i in range(8)])
    omnibus, pairwise = stats.compare_models(_long(dice), path="nonparametric")
    # rank sums 10, 14, 24: Q = 12 / (8 * 3 * 4) * (10**2 + 14**2 + 24**2) - 3 * 8 * 4 = 13, p = exp(-13 / 2)
    friedman = scipy_stats.friedmanchisquare(dice["medsam"], dice["sam"], dice["sam2"])
    assert omnibus.iloc[0][["test", "statistic", "p"]].tolist() == pytest.approx(
        ["Friedman", friedman.statistic, friedman.pvalue])
    assert omnibus.iloc[0][["statistic", "p"]].tolist() == pytest.approx([13.0, np.exp(-6.5)])

    pairs = [("medsam", "sam"), ("medsam", "sam2"), ("sam", "sam2")]
    assert list(zip(pairwise["model_a"], pairwise["model_b"])) == pairs
    p_unc = [scipy_stats.wilcoxon(dice[a], dice[b]).pvalue for a, b in pairs]
    np.testing.assert_allclose(pairwise["p_unc"], p_unc)
    # exact: W = 1 + 2 = 3 has 5 of 2**8 sign patterns at or below it; W = 0 has 1; two-sided
    np.testing.assert_allclose(pairwise["p_unc"], [10 / 256, 2 / 256, 2 / 256])
    np.testing.assert_allclose(pairwise["p_fdr_bh"], multipletests(p_unc, method="fdr_bh")[1])
    np.testing.assert_allclose(pairwise["p_fdr_bh"], [10 / 256, 3 / 256, 3 / 256])  # BH: 2/256 * 3/2
    assert pairwise["significant"].all()
    assert pairwise["higher"].tolist() == ["sam", "sam2", "sam2"]
    np.testing.assert_allclose(pairwise["difference"], [-0.155, -0.225, -0.085], atol=1e-9)
    assert set(pairwise["difference_of"]) == {"median of a - b"}


def test_two_models_are_compared_by_wilcoxon_or_paired_t(weeks):
    pair = weeks[["Before", "3 week"]]
    first, second = pair["3 week"], pair["Before"]  # models in sorted order
    omnibus, _ = stats.compare_models(_long(pair), path="nonparametric")
    wilcoxon = scipy_stats.wilcoxon(first, second)
    assert omnibus.iloc[0][["test", "statistic", "p"]].tolist() == pytest.approx(
        ["Wilcoxon signed-rank", wilcoxon.statistic, wilcoxon.pvalue])
    omnibus, _ = stats.compare_models(_long(pair), path="parametric")
    ttest = scipy_stats.ttest_rel(first, second)
    assert omnibus.iloc[0][["test", "statistic", "p"]].tolist() == pytest.approx(
        ["paired t-test", ttest.statistic, ttest.pvalue])


def test_comparison_per_dataset_and_incomplete_subjects():
    data = pd.concat([_long(pg.read_dataset("rm_anova_wide"), "a"), _long(pg.read_dataset("rm_anova_wide"), "b")])
    omnibus, pairwise = stats.compare_models(data, path="nonparametric")
    assert omnibus["dataset"].tolist() == ["a", "b"]
    assert omnibus["n_incomplete"].tolist() == [3, 3]
    assert len(pairwise) == 12
    with pytest.raises(ValueError, match="more than one 'value'"):
        stats.compare_models(pd.concat([data, data]))
    with pytest.raises(ValueError, match="'path'"):
        stats.compare_models(data, path="bayesian")


def test_models_with_identical_values_are_reported_without_a_test(weeks):
    same = pd.DataFrame({"a": weeks["Before"], "b": weeks["Before"], "c": weeks["Before"]})
    omnibus, pairwise = stats.compare_models(_long(same), path="nonparametric")
    assert omnibus.iloc[0]["test"] == "none: identical values"
    assert not omnibus.iloc[0]["significant"] and np.isnan(omnibus.iloc[0]["p"])
    assert pairwise.empty


def test_assumption_checks_decide_between_paths():
    rng = np.random.default_rng(3)
    normal = [rng.normal(0.8, 0.05, 40) for _ in range(3)]
    assert stats.check_assumptions(normal).parametric
    skewed = [rng.exponential(1, 40) ** 3 for _ in range(3)]
    checks = stats.check_assumptions(skewed)
    assert not checks.parametric
    assert checks.shapiro_p == pytest.approx([scipy_stats.shapiro(group).pvalue for group in skewed])


# --- intraclass correlation ------------------------------------------------------------------


def test_icc_3_1_reproduces_the_published_wine_ratings():
    # pingouin 'icc' (real-statistics.com): ICC(3,1) = 0.729, F(7, 21) = 11.787, 95% CI [0.43, 0.93]
    icc = stats.icc_3_1(pg.read_dataset("icc"), WINES)
    assert icc.method == "ICC(3,1)"
    assert icc.icc == pytest.approx(0.729, abs=5e-4)
    assert (round(icc.ci_low, 2), round(icc.ci_high, 2)) == (0.43, 0.93)


def test_mixed_model_icc_equals_icc_3_1_on_balanced_data():
    wines = pg.read_dataset("icc")
    assert stats.mixed_model_icc(wines, WINES) == pytest.approx(stats.icc_3_1(wines, WINES).icc, abs=1e-3)


def test_bootstrap_mixed_icc_is_reproducible_by_seed():
    wines = pg.read_dataset("icc")
    first = stats.bootstrap_mixed_icc(wines, WINES, n_boot=25, seed=7)
    assert first == stats.bootstrap_mixed_icc(wines, WINES, n_boot=25, seed=7)
    assert first != stats.bootstrap_mixed_icc(wines, WINES, n_boot=25, seed=8)
    assert first.ci_low <= first.median <= first.ci_high
    assert first.icc == pytest.approx(stats.mixed_model_icc(wines, WINES))


# --- Bland-Altman, regression, correlation ---------------------------------------------------


def test_bland_altman_matches_numpy():
    data = pg.read_dataset("blandaltman")  # Giavarina (2015), methods A and B
    differences = (data["B"] - data["A"]).to_numpy(float)
    result = stats.bland_altman(data["A"], data["B"], n_boot=2000)
    sd = np.std(differences, ddof=1)
    assert result.bias == pytest.approx(np.mean(differences))
    assert (result.loa_low, result.loa_high) == pytest.approx(
        (np.mean(differences) - 1.96 * sd, np.mean(differences) + 1.96 * sd))
    percentile = stats.bland_altman(data["A"], data["B"], parametric=False, n_boot=2000)
    assert percentile.bias == pytest.approx(np.median(differences))
    assert (percentile.loa_low, percentile.loa_high) == pytest.approx(tuple(np.percentile(differences, [2.5, 97.5])))
    for estimate, (low, high) in [(result.bias, result.bias_ci), (result.loa_low, result.loa_low_ci),
                                  (result.loa_high, result.loa_high_ci)]:
        assert low < estimate < high


def test_bland_altman_bootstrap_is_reproducible_by_seed():
    data = pg.read_dataset("blandaltman")
    first = stats.bland_altman(data["A"], data["B"], n_boot=500, seed=1)
    assert first == stats.bland_altman(data["A"], data["B"], n_boot=500, seed=1)
    assert first.bias_ci != stats.bland_altman(data["A"], data["B"], n_boot=500, seed=2).bias_ci


def test_linear_regression_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, 30)
    y = 1.5 * x + 2 + rng.normal(0, 1, 30)
    fit = stats.linear_regression(x, y)
    reference = scipy_stats.linregress(x, y)
    assert (fit.slope, fit.intercept, fit.r2) == pytest.approx(
        (reference.slope, reference.intercept, reference.rvalue ** 2))
    assert fit.predict(np.array([0.0, 1.0])) == pytest.approx([reference.intercept, reference.intercept + reference.slope])


def test_gaussian_process_follows_a_curve_that_a_line_misses():
    rng = np.random.default_rng(0)
    x = np.linspace(0, 6, 40)
    y = np.sin(x) + rng.normal(0, 0.05, 40)
    fit = stats.gaussian_process_regression(x, y, seed=0)
    assert fit.r2 > 0.95 > stats.linear_regression(x, y).r2
    assert np.abs(fit.predict(x) - np.sin(x)).max() < 0.15


def test_agreement_takes_the_path_of_its_checks():
    data = _biomarkers()
    results = stats.agreement(data, "manual", n_boot=10)
    assert [(r.dataset, r.model) for r in results] == [("knee", "sam"), ("knee", "sam2"), ("thigh", "sam"),
                                                       ("thigh", "sam2")]
    for result in results:
        reference, candidate = result.pairs["reference"], result.pairs["candidate"]
        assert result.spearman_rho == pytest.approx(scipy_stats.spearmanr(reference, candidate).statistic)
        assert result.parametric == stats.check_assumptions([reference.to_numpy(), candidate.to_numpy()]).parametric
    parametric = [r for r in results if r.parametric]
    assert parametric, "normal simulated measurements should pass Shapiro-Wilk and Levene"
    first = parametric[0]
    long = _long(first.pairs)
    icc = pg.intraclass_corr(long, "subject", "model", "value").set_index("Type").at["ICC(C,1)", "ICC"]
    assert (first.icc.method, first.icc.icc) == ("ICC(3,1)", pytest.approx(icc))
    assert (first.regression.method, first.bland_altman.method) == ("linear", "mean +- 1.96 SD")

    forced = stats.agreement(data[data["dataset"] == "knee"], "manual", path="nonparametric", n_boot=10)
    assert {(r.icc.method, r.regression.method, r.bland_altman.method) for r in forced} == {
        ("mixed-model bootstrap", "gaussian process", "median, 2.5/97.5 percentiles")}
    table = stats.agreement_table(forced)
    assert table["path"].tolist() == ["non-parametric"] * 2
    with pytest.raises(ValueError, match="reference 'radiologist'"):
        stats.agreement(data, "radiologist")


# --- mixed-effects model of Dice -------------------------------------------------------------


def test_vif_screening_drops_a_collinear_predictor():
    rng = np.random.default_rng(0)
    predictors = pd.DataFrame({"echo_time": rng.normal(size=50), "flip_angle": rng.normal(size=50)})
    predictors["echo_plus_flip"] = predictors["echo_time"] + predictors["flip_angle"] + rng.normal(0, 0.01, 50)
    kept, table = stats.screen_vif(predictors, threshold=10)
    assert len(kept) == 2 and "echo_plus_flip" not in kept
    assert table.loc[table["dropped"], "predictor"].tolist() == ["echo_plus_flip"]
    design = sm.add_constant(predictors[kept].to_numpy())
    final = table[~table["dropped"]].set_index("predictor")["vif"]
    assert [final[name] for name in kept] == pytest.approx([variance_inflation_factor(design, i + 1) for i in range(2)])
    assert stats.screen_vif(predictors[["echo_time", "flip_angle"]])[0] == ["echo_time", "flip_angle"]


@pytest.mark.filterwarnings("ignore:The MLE may be on the boundary")  # small dataset variance, by design
def test_mixed_model_recovers_known_fixed_effects():
    data, effects = _segmentation_runs()
    data.loc[data.index[::40], "flip_angle"] = np.nan
    result = stats.dice_mixed_model(data, ["echo_time", "echo_time_us", "flip_angle", "acquisition", "model"],
                                    Columns(value="dice"))
    assert result.dropped == ["echo_time"] or result.dropped == ["echo_time_us"]
    assert result.random_effects == "dataset/subject"
    assert result.n_imputed == data["flip_angle"].isna().sum()
    fixed = result.coefficients[result.coefficients["kind"] == "fixed"].set_index("term")
    echo = fixed.loc["echo_time", "estimate"] if "echo_time" in fixed.index else fixed.loc["echo_time_us", "estimate"] * 1000
    assert echo == pytest.approx(effects["echo_time"], abs=5e-4)
    assert fixed.loc["flip_angle", "estimate"] == pytest.approx(effects["flip_angle"], abs=2e-4)
    assert fixed.loc["model_sam2", "estimate"] == pytest.approx(0.06, abs=0.01)
    variances = result.coefficients[result.coefficients["kind"] == "variance"]["term"].tolist()
    assert variances == ["dataset (random intercept)", "subject within dataset (random intercept)", "residual"]


# --- msk-eval stats --------------------------------------------------------------------------


def test_cli_writes_tables_and_figures(tmp_path, capsys):
    data = _biomarkers(n=15).rename(columns={"value": "volume"})
    data["field_strength"] = np.where(data["subject"] < "s08", 1.5, 3.0)
    data["slice_thickness"] = np.random.default_rng(0).uniform(0.7, 4, len(data))
    csv = tmp_path / "volumes.csv"
    data.to_csv(csv, index=False)
    config = tmp_path / "stats.yaml"
    config.write_text(yaml.safe_dump({"value": "volume", "reference": "manual", "n_boot": 10,
                                      "predictors": ["field_strength", "slice_thickness"], "units": "cm3"}))
    out = tmp_path / "out"
    assert cli.main(["stats", str(csv), "--config", str(config), "--out", str(out), "--path", "nonparametric"]) == 0

    pairs = [f"{dataset}_{model}" for dataset, model in itertools.product(["knee", "thigh"], ["sam", "sam2"])]
    expected = {"config.yaml", "comparison.csv", "pairwise.csv", "agreement.csv", "mixed_model.csv", "vif.csv",
                "volume_by_model.png", *(f"bland_altman_{p}.png" for p in pairs), *(f"regression_{p}.png" for p in pairs)}
    assert {path.name for path in out.iterdir()} == expected
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comparison = pd.read_csv(out / "comparison.csv")
    assert comparison["test"].tolist() == ["Friedman", "Friedman"]
    agreement = pd.read_csv(out / "agreement.csv")
    assert agreement["icc_method"].unique().tolist() == ["mixed-model bootstrap"]
    assert len(pd.read_csv(out / "pairwise.csv")) == 6
    assert set(pd.read_csv(out / "vif.csv")["predictor"]) == {"field_strength", "slice_thickness"}
    assert yaml.safe_load((out / "config.yaml").read_text())["path"] == "nonparametric"
    printed = capsys.readouterr().out
    assert "Friedman" in printed and "agreement with manual" in printed and "mixed model of volume" in printed


@pytest.mark.parametrize("entries, key", [({"alpha": 2}, "'alpha'"), ({"n_boot": "many"}, "'n_boot'"),
                                          ({"colour": "red"}, "colour"), ({"path": "bayes"}, "'path'"),
                                          ({"predictors": "echo_time"}, "'predictors'")])
def test_cli_config_errors_name_the_key(tmp_path, capsys, entries, key):
    csv = tmp_path / "values.csv"
    _biomarkers(n=5).to_csv(csv, index=False)
    config = tmp_path / "stats.yaml"
    config.write_text(yaml.safe_dump(entries))
    assert cli.main(["stats", str(csv), "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_offers_the_paths_of_the_statistics():
    assert cli.PATH_CHOICES == stats.PATHS


def test_cli_missing_column_names_the_option(tmp_path, capsys):
    csv = tmp_path / "values.csv"
    _biomarkers(n=5).to_csv(csv, index=False)
    assert cli.main(["stats", str(csv), "--value", "dice", "--out", str(tmp_path / "out")]) == 2
    assert "column 'dice' (key 'value')" in capsys.readouterr().err
