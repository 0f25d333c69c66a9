"""The Extensions Index submission (catalog entry, .s4ext, CMake metadata) and the demo card's codes.

Nothing here downloads anything: the rules of Slicer's ExtensionsIndex checker and of the catalog
entry schema are restated in our own words below, each with the file it comes from, and every URL we
publish is mapped back to the file in this repository that it will serve once pushed to
github.com/UNet3DSegment/SlicerUNet3DSegment. Sources (read at Slicer/ExtensionsIndex 07f1d1b and
Slicer/Slicer 583e9b3):

- [schema]    Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json
- [checker]   Slicer/ExtensionsIndex scripts/check_description_files.py
- [index]     Slicer/ExtensionsIndex README.md (tiers) and .github/PULL_REQUEST_TEMPLATE.md (checklist)
- [terms]     Slicer/Slicer Modules/Loadable/Terminologies/Resources/
              SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json and
              SegmentationCategoryTypeModifier-DICOM-Master.json (installed as ``*.term.json``)
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from UNet3DSegmentLib.engine.card import load_card

ROOT = Path(__file__).resolve().parent.parent
CATALOG_FILE = ROOT / "UNet3DSegment.json"
S4EXT_FILE = ROOT / "UNet3DSegment.s4ext"
CMAKE_FILE = ROOT / "CMakeLists.txt"
README_FILE = ROOT / "README.md"
DEMO_CARD = ROOT / "Resources" / "Models" / "brain_tissue_demo.json"

ORGANISATION = "UNet3DSegment"
REPOSITORY = "SlicerUNet3DSegment"
EXTENSION_NAME = "UNet3DSegment"

# --- catalog entry schema v1.0.1, restated -------------------------------------------------------
# [schema]: "$id" of v1.0.1; the Index's entries reference it with a trailing "#" (243 of its 260
# catalog files at 07f1d1b do; 10 still use v1.0.0, 6 v1.0.2); [checker] check_json_schema
# downloads the schema from this URL and validates the entry with it.
SCHEMA_V101_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#"
# [schema] "required".
REQUIRED_KEYS = {"$schema", "category", "scm_url"}
# [schema] "properties" with "additionalProperties": false; the JSON type of each.
KEY_TYPES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}
# [schema] scm_type "enum".
SCM_TYPES = {"git", "local"}
# [schema] tier: integer, minimum 1, maximum 5. [index] README.md: tiers 1 (experimental),
# 3 (community-supported) and 5 (core-supported) are in use; 2 and 4 are reserved.
TIER_RANGE = (1, 5)
TIERS_IN_USE = {1, 3, 5}
# [checker] check_scm_url_syntax: the URL must contain "://" and its scheme must be one of these.
SCM_URL_SCHEMES = {"git", "https"}
# [checker] check_git_repository_name: the repository name (last path part, ".git" dropped) must
# start with one of these unless it is on the checker's exception list (we are not).
REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
# [checker] check_category: a few of ACCEPTED_EXTENSION_CATEGORIES (ours is "Segmentation").
SOME_ACCEPTED_CATEGORIES = {"Segmentation", "Neuroimaging", "Quantification", "Utilities"}
# [checker] check_license_file: names it accepts for the license file in the repository root.
LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
# [checker] check_repository_size: the checked-out repository must not exceed 100 MB.
REPOSITORY_SIZE_LIMIT = 100 * 1024 * 1024
# [checker] validate_image_url: an icon/screenshot URL must start with "http" and serve a PNG, JPEG
# or GIF; raw.githubusercontent.com serves these by file extension.
IMAGE_SUFFIXES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".gif": b"GIF8"}


def catalog_v101_problems(entry: object) -> list[str]:
    """Every way ``entry`` breaks catalog entry schema v1.0.1 (empty when it conforms)."""
    if not isinstance(entry, dict):
        return ["the entry must be a JSON object"]
    problems = [f"{key} is required" for key in sorted(REQUIRED_KEYS - set(entry))]
    problems += [f"{key} is not a v1.0.1 property" for key in sorted(set(entry) - set(KEY_TYPES))]
    for key, expected in KEY_TYPES.items():
        if key not in entry:
            continue
        value = entry[key]
        # JSON booleans are not integers for a JSON schema, although bool subclasses int in Python.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            problems.append(f"{key} must be a JSON {expected.__name__}, got {value!r}")
    if isinstance(entry.get("scm_type"), str) and entry["scm_type"] not in SCM_TYPES:
        problems.append(f"scm_type must be one of {sorted(SCM_TYPES)}, got {entry['scm_type']!r}")
    if isinstance(entry.get("build_dependencies"), list):
        problems += [f"build_dependencies items must be strings, got {item!r}"
                     for item in entry["build_dependencies"] if not isinstance(item, str)]
    tier = entry.get("tier")
    if isinstance(tier, int) and not isinstance(tier, bool) and not TIER_RANGE[0] <= tier <= TIER_RANGE[1]:
        problems.append(f"tier must be in {TIER_RANGE[0]}..{TIER_RANGE[1]}, got {tier}")
    return problems


def repository_name(scm_url: str) -> str:
    """The repository name the checker derives from scm_url: last path part, extension dropped."""
    last = urlsplit(scm_url.strip().strip("/")).path.split("/")[-1]
    return last[: -len(".git")] if last.endswith(".git") else last


# --- reading our three metadata files ------------------------------------------------------------

def catalog() -> dict:
    return json.loads(CATALOG_FILE.read_text(encoding="utf-8"))


def s4ext() -> dict[str, str]:
    """Keyword -> value of the .s4ext (first token of a non-comment line is the keyword)."""
    fields = {}
    for line in S4EXT_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    return fields


def cmake() -> dict[str, str]:
    """project() name and the EXTENSION_* variables of the top-level CMakeLists.txt.

    Written as ``set(EXTENSION_X "value")`` with the closing parenthesis right after the quote: the
    checker's pattern for EXTENSION_SCREENSHOTURLS does not allow a space there.
    """
    text = CMAKE_FILE.read_text(encoding="utf-8")
    values = dict(re.findall(r'^set\((EXTENSION_[A-Z]+) "([^"]*)"\)', text, re.M))
    project = re.search(r"^project\(\s*([^\s)]+)", text, re.M)
    values["project"] = project.group(1) if project else ""
    return values


def local_file_for(url: str) -> Path:
    """The file in this checkout that a raw.githubusercontent.com URL of our repository serves."""
    prefix = f"https://raw.githubusercontent.com/{ORGANISATION}/{REPOSITORY}/{catalog()['scm_revision']}/"
    assert url.startswith(prefix), f"{url} is not a raw URL of {ORGANISATION}/{REPOSITORY} at the scm_revision"
    return ROOT / url[len(prefix):]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == IMAGE_SUFFIXES[".png"] and header[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


# --- catalog entry -------------------------------------------------------------------------------

def test_catalog_entry_conforms_to_schema_v101() -> None:
    entry = catalog()
    assert catalog_v101_problems(entry) == []
    assert entry["$schema"] == SCHEMA_V101_URL
    # A new extension is submitted as tier 1 (experimental); maintainers may raise it ([index]).
    assert entry["tier"] == 1 and entry["tier"] in TIERS_IN_USE
    assert entry["category"] == "Segmentation" and entry["category"] in SOME_ACCEPTED_CATEGORIES
    assert entry["scm_type"] == "git" and entry["scm_revision"] == "main"
    # Not a superbuild: the extension is built in the top-level build tree ([schema] default ".").
    assert entry["build_subdirectory"] == "."
    assert entry["build_dependencies"] == [] and entry["enabled"] is True


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"category": None}, "category is required"),
        ({"tier": 0}, "tier must be in 1..5, got 0"),
        ({"tier": 6}, "tier must be in 1..5, got 6"),
        ({"tier": "1"}, "tier must be a JSON int, got '1'"),
        ({"tier": True}, "tier must be a JSON int, got True"),
        ({"enabled": "true"}, "enabled must be a JSON bool, got 'true'"),
        ({"scm_type": "svn"}, "scm_type must be one of ['git', 'local'], got 'svn'"),
        ({"build_dependencies": ["SlicerElastix", 3]}, "build_dependencies items must be strings, got 3"),
        ({"homepage": "https://example.org"}, "homepage is not a v1.0.1 property"),
    ],
)
def test_schema_check_rejects_what_v101_rejects(change: dict, problem: str) -> None:
    entry = catalog()
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    assert problem in catalog_v101_problems(entry)


def test_catalog_file_passes_the_index_checker_rules() -> None:
    raw = CATALOG_FILE.read_bytes()
    # [checker] check_json_file_format: LF line endings only.
    assert b"\r" not in raw
    # [checker] check_extension_name: the extension name is the file name and must not start with
    # "Slicer"; check_cmakelists_content: it must equal the top-level project() name.
    assert CATALOG_FILE.stem == EXTENSION_NAME and not EXTENSION_NAME.lower().startswith("slicer")
    assert cmake()["project"] == CATALOG_FILE.stem
    scm_url = catalog()["scm_url"]
    # [checker] check_scm_url_syntax.
    assert "://" in scm_url and urlsplit(scm_url).scheme in SCM_URL_SCHEMES
    # [checker] check_git_repository_name.
    assert repository_name(scm_url) == REPOSITORY and REPOSITORY.startswith(REPOSITORY_PREFIXES)
    assert scm_url == f"https://github.com/{ORGANISATION}/{REPOSITORY}.git"
    # [checker] check_license_file.
    assert any((ROOT / name).is_file() for name in LICENSE_FILE_NAMES)


def test_repository_name_rule_would_catch_the_old_name() -> None:
    assert repository_name("https://github.com/UNet3DSegment/UNet3DSegment.git") == "UNet3DSegment"
    assert not "UNet3DSegment".startswith(REPOSITORY_PREFIXES)
    assert repository_name("https://github.com/UNet3DSegment/SlicerUNet3DSegment/") == "SlicerUNet3DSegment"


def test_repository_is_under_the_size_limit() -> None:
    # [checker] check_repository_size; we count the files git would push (tracked + new, not ignored).
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available to list the repository's files")
    files = [ROOT / name for name in listing.decode().split("\0") if name]
    total = sum(path.stat().st_size for path in files if path.is_file())
    assert 0 < total < REPOSITORY_SIZE_LIMIT


# --- URLs ----------------------------------------------------------------------------------------

def test_all_published_urls_name_the_slicer_repository() -> None:
    fields, variables = s4ext(), cmake()
    homepage = f"https://github.com/{ORGANISATION}/{REPOSITORY}#readme"
    assert variables["EXTENSION_HOMEPAGE"] == fields["homepage"] == homepage
    assert fields["scmurl"] == catalog()["scm_url"]
    image_urls = [variables["EXTENSION_ICONURL"], *variables["EXTENSION_SCREENSHOTURLS"].split()]
    for url in image_urls:
        assert url.startswith(f"https://raw.githubusercontent.com/{ORGANISATION}/{REPOSITORY}/main/"), url


def test_icon_and_screenshot_urls_point_to_files_in_this_repository() -> None:
    variables = cmake()
    icon = local_file_for(variables["EXTENSION_ICONURL"])
    assert icon == ROOT / "UNet3DSegment" / "Resources" / "Icons" / "UNet3DSegment.png"
    # Slicer's developer guide (Docs/developer_guide/extensions.md, iconurl): PNG, 128x128 recommended.
    assert png_size(icon) == (128, 128)
    screenshots = [local_file_for(url) for url in variables["EXTENSION_SCREENSHOTURLS"].split()]
    # [index] PULL_REQUEST_TEMPLATE.md: at least one screenshot URL.
    assert screenshots[0] == ROOT / "Resources" / "Screenshots" / "web_app.png"
    for path in screenshots:
        assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
        assert path.read_bytes().startswith(IMAGE_SUFFIXES[path.suffix.lower()]), path
        width, height = png_size(path)
        assert width >= 640 and height >= 480, (path, width, height)


def test_local_file_mapping_rejects_a_missing_screenshot() -> None:
    old = f"https://raw.githubusercontent.com/{ORGANISATION}/{REPOSITORY}/main/docs/screenshot.png"
    assert not local_file_for(old).exists()
    with pytest.raises(AssertionError, match="is not a raw URL"):
        local_file_for("https://raw.githubusercontent.com/UNet3DSegment/UNet3DSegment/main/README.md")


def published_text_files() -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        names = [name for name in listing.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available to list the repository's files")
    suffixes = {".py", ".md", ".txt", ".json", ".s4ext", ".toml", ".sh", ".cfg", ".yml", ".yaml", ".html", ".ui"}
    return [ROOT / name for name in names if Path(name).suffix in suffixes and (ROOT / name).is_file()]


# Where the repository used to be called UNet3DSegment (any letter case).
OLD_REPOSITORY_URL = re.compile(r"github(?:usercontent)?\.com/unet3dsegment/unet3dsegment\b", re.I)
MODULE_FILE = Path("UNet3DSegment") / "UNet3DSegment.py"


def test_no_file_links_to_the_old_repository_name() -> None:
    offenders = [str(path.relative_to(ROOT)) for path in published_text_files()
                 if path.relative_to(ROOT) not in (MODULE_FILE, Path(__file__).resolve().relative_to(ROOT))
                 and OLD_REPOSITORY_URL.search(path.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []


def test_module_help_links_the_slicer_repository() -> None:
    text = (ROOT / MODULE_FILE).read_text(encoding="utf-8")
    assert not OLD_REPOSITORY_URL.search(text)
    assert f"https://github.com/{ORGANISATION}/{REPOSITORY}#readme" in text


# --- the three metadata files agree --------------------------------------------------------------

def test_s4ext_and_cmake_agree_with_the_catalog_entry() -> None:
    entry, fields, variables = catalog(), s4ext(), cmake()
    assert fields["scm"] == entry["scm_type"]
    assert fields["scmurl"] == entry["scm_url"]
    assert fields["scmrevision"] == entry["scm_revision"]
    assert fields["build_subdirectory"] == entry["build_subdirectory"]
    assert fields["category"] == variables["EXTENSION_CATEGORY"] == entry["category"]
    assert fields["enabled"] == ("1" if entry["enabled"] else "0")
    # No dependencies: "NA" in the .s4ext and CMake, an empty list in the catalog entry.
    assert fields["depends"] == variables["EXTENSION_DEPENDS"] == "NA" and entry["build_dependencies"] == []
    assert fields["homepage"] == variables["EXTENSION_HOMEPAGE"]
    assert fields["iconurl"] == variables["EXTENSION_ICONURL"]
    assert fields["screenshoturls"].split() == variables["EXTENSION_SCREENSHOTURLS"].split()
    assert fields["description"] == variables["EXTENSION_DESCRIPTION"]
    assert fields["contributors"] == variables["EXTENSION_CONTRIBUTORS"]


def test_readme_covers_the_submission() -> None:
    text = README_FILE.read_text(encoding="utf-8")
    # [checker] check_git_repository_topics / [index] PULL_REQUEST_TEMPLATE.md: the GitHub topic.
    assert "`3d-slicer-extension`" in text
    assert f"https://github.com/{ORGANISATION}/{REPOSITORY}" in text
    # [index] PULL_REQUEST_TEMPLATE.md: the homepage names the license and shows an image.
    assert "Apache License 2.0" in text and "LICENSE" in text
    assert "](Resources/Screenshots/web_app.png)" in text


# --- terminology of the bundled demo card --------------------------------------------------------
# Context names: "SegmentationCategoryTypeContextName" of the two [terms] files; Slicer loads both
# at start (vtkSlicerTerminologiesModuleLogic::LoadDefaultTerminologies).
GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
# class name -> (context that lists the type, category, type), copied from the [terms] files:
# "Cerebrospinal Fluid" (65216001) is listed only in the DICOM master list (it has never been in the
# General Anatomy list), "Gray Matter" (389081007) and "White Matter" (389080008) in both; all three
# under "Anatomical Structure". Category "Body Substance" (91720002) holds only bile, body fluid,
# feces, gas and urine in both files, so the former CSF codes matched no entry.
SLICER_ENTRIES = {
    "CSF": (DICOM_MASTER, ANATOMICAL_STRUCTURE, ("SCT", "65216001", "Cerebrospinal Fluid")),
    "Grey matter": (GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "389081007", "Gray Matter")),
    "White matter": (GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "389080008", "White Matter")),
}


def test_demo_card_codes_match_slicer_entries() -> None:
    card = load_card(DEMO_CARD)
    coded = {info.name: info.terminology for info in card.classes if info.terminology is not None}
    assert set(coded) == set(SLICER_ENTRIES)
    for name, (_, category, type_) in SLICER_ENTRIES.items():
        assert (coded[name].category, coded[name].type, coded[name].type_modifier) == (category, type_, None), name


def installed_terminology_files() -> dict[str, Path]:
    """Context name -> Slicer's own segmentation terminology file, as installed with a Python package."""
    found = {}
    for package in ("trame_slicer", "slicer_core", "slicer"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in Path(folder).rglob("SegmentationCategoryTypeModifier-*.json"):
                context = json.loads(path.read_text(encoding="utf-8")).get("SegmentationCategoryTypeContextName")
                if context:
                    found.setdefault(context, path)
    if not {GENERAL_ANATOMY, DICOM_MASTER} <= set(found):
        pytest.skip("Slicer's terminology files are not installed (pip install '.[web]' brings them)")
    return found


def contexts_listing(files: dict[str, Path], category: tuple, type_: tuple) -> dict[str, tuple]:
    """Context name -> (category meaning, type meaning) for each file that lists the code pair.

    Slicer matches codes on coding scheme designator and code value only.
    """
    listing = {}
    for context, path in files.items():
        for cat in json.loads(path.read_text(encoding="utf-8"))["SegmentationCodes"]["Category"]:
            if (cat["CodingSchemeDesignator"], cat["CodeValue"]) != category[:2]:
                continue
            for typ in cat.get("Type", []):
                if (typ["CodingSchemeDesignator"], typ["CodeValue"]) == type_[:2]:
                    listing[context] = (cat["CodeMeaning"], typ["CodeMeaning"])
    return listing


def test_demo_card_codes_are_listed_in_slicers_terminology_files() -> None:
    files = installed_terminology_files()
    for info in load_card(DEMO_CARD).classes:
        if info.terminology is None:
            continue
        context = SLICER_ENTRIES[info.name][0]
        listing = contexts_listing(files, info.terminology.category, info.terminology.type)
        assert context in listing, (info.name, listing)
        assert listing[context] == (info.terminology.category[2], info.terminology.type[2])
    csf = SLICER_ENTRIES["CSF"]
    assert GENERAL_ANATOMY not in contexts_listing(files, csf[1], csf[2])
    assert contexts_listing(files, ("SCT", "91720002", "Body Substance"), csf[2]) == {}


def test_slicer_finds_the_demo_card_terminology() -> None:
    slicer = pytest.importorskip("slicer")
    files = installed_terminology_files()
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    if not hasattr(logic, "UpdateEntryFromLoadedTerminologies") or not hasattr(logic, "FindTerminologyNames"):
        pytest.skip("this slicer-core predates the cross-context terminology look-up (Slicer 5.10)")
    for path in files.values():
        assert logic.LoadTerminologyFromFile(str(path))
    for info in load_card(DEMO_CARD).classes:
        if info.terminology is None:
            continue
        context, category, type_ = SLICER_ENTRIES[info.name]
        names = logic.FindTerminologyNames(*info.terminology.category[:2], *info.terminology.type[:2], "", "", [])
        assert context in names, (info.name, names)
        # What the terminology picker does with the segment's tag: look the codes up in the loaded
        # contexts (the tag's own context first) and take that entry.
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
            info.terminology.to_slicer_string(), entry)
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [], [])
        assert entry.GetTerminologyContextName() == context, info.name
        assert entry.GetTypeObject().GetCodeValue() == type_[1]
        assert entry.GetTypeObject().GetCodeMeaning() == type_[2]


def test_csf_tag_names_the_context_that_lists_it() -> None:
    csf = next(info for info in load_card(DEMO_CARD).classes if info.name == "CSF")
    # The string Slicer's own UpdateEntryFromLoadedTerminologies + SerializeTerminologyEntry give.
    assert csf.terminology.to_slicer_string() == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
        "~SCT^65216001^Cerebrospinal Fluid~^^~Anatomic codes - DICOM master list~^^~^^"
    )
