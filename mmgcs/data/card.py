"""The dataset card (README.md): Hub YAML metadata built with datasets' own writers, then a human description."""

from __future__ import annotations

import datasets
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from mmgcs.data.splits import SPLITS

# Exactly as TMDb's terms ask (see ../shared/data/README.md).
TMDB_ATTRIBUTION = "This product uses the TMDb API but is not endorsed or certified by TMDb"
TMDB_TERMS_URL = "https://www.themoviedb.org/api-terms-of-use"
MMIMDB_CITATION = (
    "Arevalo, J., Solorio, T., Montes-y-Gómez, M., González, F. A. (2017). Gated Multimodal Units for "
    "Information Fusion. ICLR 2017 Workshop. (MM-IMDb)"
)


def size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def render_card(
    dataset: datasets.DatasetDict,
    split_bytes: dict[str, int],
    download_size: int,
    report: dict,
    pretty_name: str = "MMGCS movie genres (plot + poster)",
) -> str:
    features = dataset["train"].features
    labels = features["genres"].feature.names
    formats = {s["format"] for s in report["sources"].values()}
    total = sum(len(d) for d in dataset.values())

    data = DatasetCardData(
        pretty_name=pretty_name,
        language=["en"],
        license="other",
        license_name="tmdb-terms-of-use" if formats - {"mmimdb"} else "mm-imdb",
        license_link=TMDB_TERMS_URL if formats - {"mmimdb"} else None,
        task_categories=["text-classification", "image-classification"],
        task_ids=["multi-label-classification", "multi-label-image-classification"],
        size_categories=[size_category(total)],
        tags=["movies", "genre-classification", "multimodal", "multi-label", "posters", "mmgcs"],
    )
    splits = SplitDict()
    for name in SPLITS:
        splits.add(SplitInfo(name=name, num_bytes=split_bytes[name], num_examples=len(dataset[name])))
    info = DatasetInfo(config_name="default", features=features, splits=splits,
                       download_size=download_size, dataset_size=sum(split_bytes.values()))
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    MetadataConfigs(
        {"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in SPLITS]}}
    ).to_dataset_card_data(data)

    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + _body(dataset, labels, report, formats, pretty_name)))


def _body(dataset, labels, report, formats, pretty_name) -> str:
    lines = [f"# {pretty_name}", "", *_INTRO_AND_FIELDS]
    lines += _splits_section(report) + _labels_section(labels, report) + _sources_section(report)
    return "\n".join(lines + _terms_section(formats)) + "\n"


_INTRO_AND_FIELDS = [
    "Movies with a plot summary, a poster (when one could be had) and their genres, for multi-label genre "
    "classification from text, image or both. Built by MMGCS with "
    "`python -m mmgcs.data build`; `build_report.json` beside this card lists every movie that was dropped "
    "or changed, with the reason.",
    "",
    "```python",
    "from datasets import load_dataset",
    'ds = load_dataset("<this folder or repo id>")',
    'labels = ds["train"].features["genres"].feature.names',
    "```",
    "",
    "## Fields",
    "",
    "| field | type | notes |",
    "|---|---|---|",
    "| `id` | int64 | source id (TMDb id, or IMDb number for MM-IMDb); unique across splits |",
    "| `title` | string | may be null |",
    "| `plot` | string | plot summary, surrounding whitespace stripped; null when the source has none (then the poster is present) |",
    "| `poster` | image | the poster, RGB, bytes embedded; null when missing or unusable |",
    "| `genres` | list of class labels | multi-label; may be empty when all of a movie's genres are too rare |",
    "| `source` | string | which source the row came from |",
    "",
]


def _splits_section(report) -> list[str]:
    lines = ["## Splits", "", "| split | movies | with poster | with plot |", "|---|---:|---:|---:|"]
    for name in SPLITS:
        s = report["splits"][name]
        lines.append(f"| {name} | {s['movies']:,} | {s['with_poster']:,} | {s['with_plot']:,} |")
    official = [n for n, s in report["sources"].items() if s.get("official_split", 0)]
    lines += [
        "",
        f"Splits are made by iterative stratification over the genres (Sechidis et al., 2011; "
        f"`iterative-stratification`), ratios {report['options']['split_ratios']}, seed {report['options']['seed']}; "
        "an id is never in two splits."
        + (f" Rows of {', '.join(official)} keep their source's official split." if official else ""),
        "",
    ]
    return lines


def _labels_section(labels, report) -> list[str]:
    lines = [
        "## Labels",
        "",
        f"{len(labels)} genres"
        + (f" with at least {report['options']['min_genre_count']} movies" if not report["options"]["genres"] else "")
        + ". Movies per genre:",
        "",
        "| genre | " + " | ".join(SPLITS) + " |",
        "|---|" + "---:|" * len(SPLITS),
    ]
    for g in labels:
        lines.append(f"| {g} | " + " | ".join(f"{report['splits'][s]['per_genre'].get(g, 0):,}" for s in SPLITS) + " |")
    if report["removed_genres"]:
        removed = ", ".join(f"{g} ({n})" for g, n in report["removed_genres"].items())
        lines += ["", f"Genres left out of the labels (too rare or not requested): {removed}."]
    return lines + [""]


def _sources_section(report) -> list[str]:
    lines = ["## Sources", "", "| source | format | read | kept | with poster |", "|---|---|---:|---:|---:|"]
    for name, s in report["sources"].items():
        lines.append(f"| {name} | {s['format']} | {s['read']:,} | {s['kept']:,} | {s['with_poster']:,} |")
    return lines


def _terms_section(formats) -> list[str]:
    lines = ["", "## Terms and attribution", ""]
    if formats - {"mmimdb"}:
        lines += [
            f"Metadata and posters come from The Movie Database (TMDb). {TMDB_ATTRIBUTION}.",
            "",
            f"TMDb's [terms]({TMDB_TERMS_URL}) allow non-commercial use. Posters are copyrighted studio artwork: "
            "use them for research, training and tests only.",
        ]
    if "mmimdb" in formats:
        lines += ["", f"MM-IMDb rows: cite {MMIMDB_CITATION}"]
    return lines
