"""Hostile and careless input on real Milvus Lite files and the real embedding model: file
names that break expression quoting, a collection another tool made, links out of the
folder, files that break their parsers, and filters that would match the wrong rows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import PROFILE, contents, fresh_contents
from pymilvus import DataType, MilvusClient

from rag_app import RagAppError, build_index, build_retriever, build_vector_store, ingest_path
from rag_app.cli import main
from rag_app.components.retrieval import parse_filters

pytestmark = pytest.mark.slow

# Every character class that broke or could break a Milvus string literal or a terminal line.
HOSTILE_NAMES = [
    "café.md",  # json.dumps wrote \u00e9, which Milvus Lite refuses
    'quote"d.md',
    "it's.md",
    "back\\slash.md",
    "new\nline.md",
    "tab\tname.md",
    "emoji 😀 🇫🇷.md",
    "100%_under.md",
    "brackets [1] {x} $meta.md",
    "日本語/ページ.md",
    "#hash#.md",
]


def write(folder: Path, pages: dict[str, str]) -> None:
    for name, text in pages.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_hostile_file_names_sync_add_change_and_delete(small_cfg, embed_model, tmp_path):
    folder = tmp_path / "docs"
    write(folder, {name: f"# {name}\nVersion one of {name!r}.\n" for name in HOSTILE_NAMES})
    store = build_vector_store(small_cfg, embed_model)

    first = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert (first.added, first.updated, first.deleted) == (len(HOSTILE_NAMES), 0, 0)

    write(
        folder, {name: f"# {name}\nVersion two, longer: {name!r}. " * 3 for name in HOSTILE_NAMES}
    )
    second = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert (second.added, second.updated, second.unchanged) == (0, len(HOSTILE_NAMES), 0)
    assert contents(store) == fresh_contents(small_cfg, embed_model, folder, tmp_path / "a")

    for name in HOSTILE_NAMES[::2]:
        (folder / name).unlink()
    (folder / os.fsdecode(b"latin1-\xe9.md")).write_text("# Not UTF-8\n")  # undecodable name
    third = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert third.deleted == len(HOSTILE_NAMES[::2])
    assert [reason for _, reason in third.skipped] == [
        "its name is not valid UTF-8 (rename the file)"
    ]
    assert {doc for _, doc, _ in contents(store)} == set(HOSTILE_NAMES[1::2])
    assert contents(store) == fresh_contents(small_cfg, embed_model, folder, tmp_path / "b")
    again = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert (again.unchanged, again.chunks) == (len(HOSTILE_NAMES[1::2]), 0)


def _foreign_collection(uri: str, name: str) -> None:
    """What another tool might make: 384-d, varchar id and doc_id, none of our properties."""
    client = MilvusClient(uri=uri)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=256)
    schema.add_field("text", DataType.VARCHAR, max_length=4096)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=384)
    client.create_collection(name, schema=schema)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="IP")
    client.create_index(name, index)
    client.load_collection(name)
    client.insert(name, [{"id": "t-1", "doc_id": "theirs.md", "text": "Theirs.",
                          "embedding": [1.0] + [0.0] * 383}])  # fmt: skip
    client.close()


def test_a_collection_rag_app_did_not_make_is_refused_and_kept_unless_adopted(
    small_cfg, embed_model, tmp_path, monkeypatch, capsys
):
    uri = small_cfg.milvus.uri
    _foreign_collection(uri, "their_kb")
    docs = tmp_path / "docs"
    write(docs, {"ours.md": "# Ours\nPartitions split a collection.\n"})
    small_cfg.milvus.collection = "their_kb"
    with pytest.raises(RagAppError, match=r"'their_kb' .* was not made by rag_app .* --adopt"):
        ingest_path(small_cfg, docs, embed_model=embed_model)
    with pytest.raises(RagAppError, match=r"milvus\.adopt_foreign_collection = true"):
        build_index(small_cfg, embed_model=embed_model)  # reading it is refused too
    client = MilvusClient(uri=uri)
    assert [r["id"] for r in client.query("their_kb", filter='id != ""')] == ["t-1"]
    client.close()

    monkeypatch.setenv("RAG_APP_MILVUS__URI", uri)
    cli = ["--config", str(PROFILE), "--collection", "their_kb"]
    assert main(["ingest", str(docs), "--no-progress", "--adopt", *cli]) == 0
    assert "1 added, 0 updated, 0 unchanged, 1 deleted" in capsys.readouterr().out
    assert main(["ingest", str(docs), "--no-progress", *cli]) == 0  # ours from now on
    assert "0 added, 0 updated, 1 unchanged, 0 deleted" in capsys.readouterr().out
    assert main(["collections", "--config", str(PROFILE)]) == 0
    listed = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()}
    assert listed["their_kb"] == "all-MiniLM-L6-v2"


def test_a_link_out_of_the_folder_is_not_stored_and_a_stored_one_is_removed(
    small_cfg, embed_model, tmp_path
):
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:the secret line\n")
    docs = tmp_path / "docs"
    write(docs, {"page.md": "# Page\nInside.\n"})
    (docs / "passwd.txt").symlink_to(secret)
    store = build_vector_store(small_cfg, embed_model)

    report = ingest_path(small_cfg, docs, embed_model=embed_model, vector_store=store)
    ((path, reason),) = report.skipped
    assert Path(path).name == "passwd.txt" and "ingestion.follow_symlinks_outside" in reason
    assert {doc for _, doc, _ in contents(store)} == {"page.md"}

    small_cfg.ingestion.follow_symlinks_outside = True  # allowed: read like any file
    ingest_path(small_cfg, docs, embed_model=embed_model, vector_store=store)
    assert any("the secret line" in text for _, _, text in contents(store))
    small_cfg.ingestion.follow_symlinks_outside = False  # the default again: removed
    assert ingest_path(small_cfg, docs, embed_model=embed_model, vector_store=store).deleted == 1
    assert {doc for _, doc, _ in contents(store)} == {"page.md"}


def test_files_that_break_their_parsers_are_listed_and_the_run_goes_on(
    small_cfg, tmp_path, monkeypatch, capsys
):
    import zipfile

    docs = tmp_path / "docs"
    long_dir = "/".join(["d" * 200] * 3)
    write(docs, {
        "good.md": "# Good\nRead as usual.\n",
        "bad-yaml.md": "---\ntitle: [unclosed\n---\nBody.\n",
        "yaml-tag.md": "---\ntitle: !!python/name:os.system\n---\nBody.\n",
        "bad-date.md": "---\ndate: 2024-02-30\n---\nBody.\n",
        "long-title.md": "---\ntitle: " + "T" * 2000 + "\n---\nBody.\n",
        "long-heading.md": "# " + "H" * 2000 + "\nBody.\n",
        f"{long_dir}/deep.md": "# Deep\nA 600-character path.\n",
        "gone.md": "# Gone\nDeleted after it was listed.\n",
        "evil\n\x1b[2Jskipped everything.md": "\x00binary",
    })  # fmt: skip
    with zipfile.ZipFile(docs / "broken.docx", "w") as archive:  # malformed XML
        archive.writestr("word/document.xml", "<w:document><w:body><w:t>unclosed")
    (docs / "utf16.txt").write_bytes("UTF-16 text with a BOM.".encode("utf-16"))

    import rag_app.pipelines.ingest as ingest

    listed = ingest.discover

    def discover_then_delete(root: Path) -> list[Path]:
        files = listed(root)
        (root / "gone.md").unlink()  # between discovery and reading
        return files

    monkeypatch.setattr(ingest, "discover", discover_then_delete)
    monkeypatch.setenv("RAG_APP_MILVUS__URI", small_cfg.milvus.uri)
    assert main(["ingest", str(docs), "--no-progress", "--config", str(PROFILE)]) == 0
    out, err = capsys.readouterr()
    skipped = sorted(line for line in err.splitlines() if line.startswith("skipped "))
    reasons = dict(line.removeprefix("skipped ").split(": ", 1) for line in skipped)
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in reasons.items()}
    assert set(reasons) == {
        "bad-yaml.md", "yaml-tag.md", "bad-date.md", "broken.docx", "gone.md",
        "evil\\n\\x1b[2Jskipped everything.md",  # printed escaped: one line, no escape code
    }, err  # fmt: skip
    assert reasons["gone.md"] == "No such file or directory"
    assert reasons["bad-date.md"].startswith("invalid front matter (ValueError: day is out of")
    assert "\x1b" not in out + err
    assert "ingested 5 documents: 5 added" in out  # good, the two long ones, deep, utf16
    stored = {row["doc_id"]: row for row in _rows(small_cfg)}
    assert set(stored) == {
        "good.md",
        "long-title.md",
        "long-heading.md",
        f"{long_dir}/deep.md",
        "utf16.txt",
    }
    assert all(len(row["title"]) <= 300 for row in stored.values())


def _rows(cfg) -> list[dict]:
    client = MilvusClient(uri=cfg.milvus.uri)
    try:
        client.load_collection(cfg.milvus.collection)
        return client.query(
            cfg.milvus.collection, filter='id != ""', output_fields=["doc_id", "title", "text"]
        )
    finally:
        client.close()


def test_filter_values_are_literal_and_unknown_keys_are_reported(small_cfg, embed_model, tmp_path):
    small_cfg.retrieval.mode = "hybrid"
    docs = tmp_path / "docs"
    write(docs, {
        "a_b.md": "---\ntitle: it's \"q\" \\ 100%\n---\nPartitions split a collection.\n",
        "axb.md": "---\ntitle: its q 1000\n---\nPartitions split a collection too.\n",
        "a%b.md": "# A percent\nPartitions split a collection, again.\n",
        "ab.md": "# Plain\nPartitions split a collection, once more.\n",
    })  # fmt: skip
    store = build_vector_store(small_cfg, embed_model)
    ingest_path(small_cfg, docs, embed_model=embed_model, vector_store=store)
    index = build_index(small_cfg, embed_model=embed_model, vector_store=store)

    def found(*specs: str) -> set[str]:
        retriever = build_retriever(small_cfg, index, top_k=10, filters=parse_filters(specs))
        return {hit.node.metadata["source"] for hit in retriever.retrieve("partitions")}

    assert found("source=a_b*") == {"a_b.md"}  # '_' is not a wildcard
    assert found("source=a%*") == {"a%b.md"}  # nor '%'
    assert found("source=a*") == {"a_b.md", "axb.md", "a%b.md", "ab.md"}
    assert found('title=it\'s "q" \\ 100%') == {"a_b.md"}
    assert found("title=it's*", "doc_type=markdown") == {"a_b.md"}
    with pytest.raises(RagAppError) as error:
        found("sourse=a_b.md")
    message = str(error.value)
    assert message.startswith("no chunk in collection 'rag_docs' has the metadata key 'sourse'")
    assert "doc_type" in message and "source" in message and "title" in message


def test_every_string_the_escaper_writes_matches_itself_in_milvus_lite(tmp_path):
    """The round trip of tests/test_properties.py, against the real parser: any text as a
    schema field and as a dynamic (metadata) field, by equality and by prefix."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from rag_app.components.milvus_expr import equals, starts_with

    client = MilvusClient(uri=str(tmp_path / "literals.db"))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=65_535)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=2)
    client.create_collection("t", schema=schema)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="IP")
    client.create_index("t", index)
    client.load_collection("t")
    inserted: dict[str, set[str]] = {}

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30))
    @example('café "q" \\ \\u00e9 \n\r\t 😀 %_ $meta["x"] \' or id != ""')
    def check(value: str) -> None:
        row = str(sum(map(len, inserted.values())))
        client.insert("t", [{"id": row, "doc_id": value, "source": value, "embedding": [1, 0]}])
        inserted.setdefault(value, set()).add(row)

        def hits(expression: str) -> set[str]:
            return {r["id"] for r in client.query("t", filter=expression, output_fields=["id"])}

        assert hits(equals("doc_id", value)) == hits(equals("source", value)) == inserted[value]
        prefixed = {r for v, rs in inserted.items() if v.startswith(value[:3]) for r in rs}
        assert hits(starts_with("doc_id", value[:3])) == prefixed
        assert hits(starts_with("source", value[:3])) == prefixed

    try:
        check()
    finally:
        client.close()
