"""Licence review (issue 18): restricted licences show their terms and load only after a recorded acceptance;
a model that declares no licence is refused in a commercial workspace unless an admin accepts it by name."""

import shutil
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from sqlmodel import Session, select

from alignloop.cli import main
from alignloop.core import AlignloopError, crud, licences
from alignloop.core.config import load_settings
from alignloop.core.models import LicenceAcceptance
from alignloop.core.registry import accept_licence, locate, resolve


@pytest.mark.parametrize(
    "licence, kind",
    [
        ("apache-2.0", "permissive"),
        ("mit", "permissive"),
        ("cc-by-4.0", "permissive"),
        ("llama2", "restricted"),
        ("llama3", "restricted"),
        ("llama3.1", "restricted"),
        ("llama3.2", "restricted"),
        ("Llama 3.3 Community License Agreement", "restricted"),
        ("gemma", "restricted"),
        ("openrail", "restricted"),
        ("creativeml-openrail-m", "restricted"),
        ("bigscience-bloom-rail-1.0", "restricted"),
        ("bigcode-openrail-m", "restricted"),
        ("apache-2.0, llama3.1", "restricted"),  # the most restrictive licence named wins
        ("cc-by-nc-4.0", "noncommercial"),
        ("cc-by-nc-4.0, llama3", "noncommercial"),
        (None, "unknown"),
        ("", "unknown"),
        ("other", "unknown"),  # "other" without a licence_name names no terms
    ],
)
def test_classification(licence, kind):
    assert licences.classify(licence).kind == kind


def test_terms_name_the_thresholds_and_policies():
    llama = licences.classify("llama3.1")
    assert "700 million monthly active users" in llama.terms and "acceptable use policy" in llama.terms
    assert "EU" in licences.classify("llama3.2").terms
    assert "Prohibited Use Policy" in licences.classify("gemma").terms
    assert "Attachment A" in licences.classify("bigscience-openrail-m").terms


def with_card(tmp_path, tiny_model_dir, name, licence):
    path = tmp_path / name
    shutil.copytree(tiny_model_dir, path)
    if licence is None:
        (path / "README.md").unlink()
    else:
        (path / "README.md").write_text(f"---\nlicense: {licence}\n---\n")
    return path


def acceptances(engine):
    with Session(engine) as s:
        return s.exec(select(LicenceAcceptance)).all()


def test_restricted_licence_is_refused_with_its_terms_then_loads_once_accepted(
    workspace, tmp_path, tiny_model_dir, capsys
):
    settings, engine, _ = workspace
    path = with_card(tmp_path, tiny_model_dir, "llama-ft", "llama3.1")
    with pytest.raises(AlignloopError) as refused:
        locate(str(path), settings=settings)
    message = str(refused.value)
    assert "\n" not in message and "licensed 'llama3.1' (Llama 3.1/3.3 Community License)" in message
    assert "700 million monthly active users" in message
    assert f"alignloop licences accept {path}" in message
    # --allow-noncommercial is about a different thing: it does not let a restricted licence through
    with pytest.raises(AlignloopError, match="Llama 3.1"):
        locate(str(path), settings=settings, allow_noncommercial=True)
    assert acceptances(engine) == []

    before = datetime.now(UTC) - timedelta(seconds=1)
    assert main(["licences", "accept", str(path), "--workspace", str(settings.workspace)]) == 0
    assert "accepted:" in capsys.readouterr().out
    [row] = acceptances(engine)
    assert (row.model_ref, row.licence) == (str(path.resolve()), "llama3.1")
    accepted_at = row.accepted_at if row.accepted_at.tzinfo else row.accepted_at.replace(tzinfo=UTC)
    assert accepted_at >= before
    with Session(engine) as s:
        assert crud.get_user(s, name="admin").id == row.user_id

    assert locate(str(path), settings=settings).licence == "llama3.1"  # no session: reads the workspace
    assert resolve(str(path), settings=settings).licence == "llama3.1"
    assert main(["licences", "list", "--workspace", str(settings.workspace)]) == 0
    listed = capsys.readouterr().out
    assert str(path.resolve()) in listed and "llama3.1" in listed and "admin" in listed

    # a model registered on top of it carries the same licence and is covered by the same acceptance
    with Session(engine) as s:
        crud.register_model(
            s, name="llama-sft", kind="sft", base=str(path), path=str(path), licence="llama3.1"
        )
        s.commit()
        assert locate("llama-sft", settings=settings, session=s).licence == "llama3.1"

    # the acceptance was for those terms: a model that now declares other terms needs a new one
    (path / "README.md").write_text("---\nlicense: gemma\n---\n")
    with pytest.raises(AlignloopError, match=r"licensed 'gemma' \(Gemma Terms of Use\).*Prohibited Use"):
        locate(str(path), settings=settings)


def test_undeclared_licence_is_refused_in_a_commercial_workspace_until_accepted_by_name(
    workspace, tmp_path, tiny_model_dir
):
    settings, engine, _ = workspace
    assert settings.commercial_use is True  # the default
    bare = with_card(tmp_path, tiny_model_dir, "bare", None)
    other = with_card(tmp_path, tiny_model_dir, "other-bare", None)
    with pytest.raises(AlignloopError, match=r"declares no licence, so this commercial workspace"):
        locate(str(bare), settings=settings)
    with Session(engine, expire_on_commit=False) as s:
        row, new, _ = accept_licence(
            str(bare), settings=settings, session=s, licence="custom terms, emailed by the author 2026-11"
        )
        s.commit()
    assert new and row.licence == "" and row.note.startswith("custom terms")
    assert locate(str(bare), settings=settings).licence is None
    with pytest.raises(AlignloopError, match="declares no licence"):  # accepted by name: only that model
        locate(str(other), settings=settings)
    with Session(engine) as s:  # accepting twice records nothing new
        assert accept_licence(str(bare), settings=settings, session=s)[1] is False

    config_file = settings.workspace / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "commercial_use": False}))
    assert locate(str(other), settings=load_settings(settings.workspace)).licence is None
    # ...but restricted and non-commercial licences keep their own rules in a non-commercial workspace
    gated = with_card(tmp_path, tiny_model_dir, "gemma-ft", "gemma")
    with pytest.raises(AlignloopError, match="Gemma Terms of Use"):
        locate(str(gated), settings=load_settings(settings.workspace))


def test_permissive_models_load_untouched(workspace, tiny_model_dir, tmp_path):
    settings, engine, _ = workspace
    mit = with_card(tmp_path, tiny_model_dir, "mit", "mit")
    assert resolve(str(tiny_model_dir), settings=settings).licence == "apache-2.0"
    assert locate(str(mit), settings=settings).licence == "mit"
    assert locate("minilm", settings=settings).licence == "apache-2.0"
    assert acceptances(engine) == []


def test_noncommercial_behaviour_is_unchanged_and_cannot_be_accepted(workspace, tmp_path, tiny_model_dir):
    settings, engine, _ = workspace
    nc = with_card(tmp_path, tiny_model_dir, "nc", "cc-by-nc-4.0")
    with pytest.raises(AlignloopError, match=r"licensed 'cc-by-nc-4.0', which forbids commercial use"):
        locate(str(nc), settings=settings)
    assert locate(str(nc), settings=settings, allow_noncommercial=True).licence == "cc-by-nc-4.0"
    with Session(engine) as s, pytest.raises(AlignloopError, match="an acceptance cannot lift that"):
        accept_licence(str(nc), settings=settings, session=s)
    assert acceptances(engine) == []


def test_bad_acceptances_are_one_line_and_record_nothing(workspace, tmp_path, tiny_model_dir, capsys):
    settings, engine, _ = workspace
    ws = str(settings.workspace)
    llama = with_card(tmp_path, tiny_model_dir, "llama", "llama3.1")
    with Session(engine) as s:
        crud.create_user(s, name="ann", role="annotator", password="annotator-pass")
        s.commit()
    cases = [
        (["licences", "accept", str(llama), "--user", "ann"], "'ann' is not an active admin"),
        (
            ["licences", "accept", str(llama), "--licence", "gemma"],
            "declares licence 'llama3.1', not 'gemma'",
        ),
        (["licences", "accept", str(tiny_model_dir)], "'apache-2.0', which needs no acceptance"),
        (["licences", "accept", "no-such-model"], "not found"),
    ]
    for argv, message in cases:
        assert main([*argv, "--workspace", ws]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert acceptances(engine) == []
    assert main(["licences", "accept", str(llama), "--licence", "Llama3.1", "--workspace", ws]) == 0
    assert [r.licence for r in acceptances(engine)] == ["llama3.1"]
