"""Sparse bag gradients + SparseAdam, the lexical ranker term, the softmax candidate loss, the deeper
encoder and bigrams, resume without duplicate log rows, and the FOLDOC-XMC builder."""

import base64
import gzip
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mhe_plugins import metrics as M
from mhe_plugins.heads import build_head
from mhe_plugins.heads.mhc_multilabel import pad_labels
from mhe_plugins.training import load_checkpoint
from xmc.data import load_dataset
from xmc.encoders import csr_to_bag
from xmc.evaluate import evaluate_model_dir
from xmc.foldoc import build_foldoc_xmc
from xmc.model import LexicalScorer, XMCModel, label_centroids
from xmc.train import TrainConfig, _optimizers, train


def _cfg(**kw):
    base = {
        "encoder": "tfidf",
        "head": "mhc",
        "num_groups": 4,
        "candidates_topk": 2,
        "hidden_dim": 8,
        "permutation_seed": None,
        "dropout": 0.0,
        "tfidf_dim": 16,
        "max_len": 8,
    }
    return {**base, **kw}


def test_sparse_bag_updates_only_the_rows_of_the_batch():
    torch.manual_seed(0)
    x = sp.csr_matrix(np.array([[1.0, 0, 0.5, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]], np.float32))
    labels = pad_labels([[1, 3], [5]])
    for sparse in (True, False):
        m = XMCModel(_cfg(sparse_grad=sparse), 12, 6)
        before = m.encoder.bag.weight.detach().clone()
        opts = _optimizers(m, 0.01, 1e-2)
        assert len(opts) == (2 if sparse else 1)
        m(csr_to_bag(x), labels).backward()
        assert m.encoder.bag.weight.grad.is_sparse == sparse
        for o in opts:
            o.step()
        changed = (m.encoder.bag.weight != before).any(1).tolist()
        # sparse: only features 0 and 2 moved; dense AdamW (weight decay) moves every row
        assert changed == ([True, False, True, False, False, False] if sparse else [True] * 6)


def test_lexical_scorer_is_weighted_cosine_to_label_centroids():
    rng = np.random.default_rng(0)
    x = sp.random(30, 50, density=0.1, format="csr", dtype=np.float32, random_state=1)
    y = sp.csr_matrix((rng.random((30, 7)) < 0.3).astype(np.float32))
    c = label_centroids(x, y)
    dense = y.toarray().T @ x.toarray()
    norm = np.linalg.norm(dense, axis=1, keepdims=True)
    np.testing.assert_allclose(
        c.toarray(), np.divide(dense, norm, out=np.zeros_like(dense), where=norm > 0), atol=1e-6
    )
    scorer = LexicalScorer(50, 7, c.nnz, weight=3.0)
    scorer.set_centroids(c)
    got, groups = scorer(**csr_to_bag(x[5:12]))
    assert groups is None
    np.testing.assert_allclose(got.detach(), 3.0 * x[5:12].toarray() @ c.toarray().T, rtol=1e-5, atol=1e-6)
    # MHC: group centroids = centroids of the documents with any label of the group (ids permuted)
    model = XMCModel(_cfg(permutation_seed=3, num_groups=3), 7, 50)
    both = model.lexical_centroids(x, y)
    group_of = model.head.group_of_global().numpy()
    assert sorted(np.bincount(group_of).tolist()) == [1, 3, 3]  # {3; 3} grouping of 7 labels
    for gi in range(3):
        docs = y[:, np.flatnonzero(group_of == gi)].sum(1).A.ravel() > 0
        v = x[np.flatnonzero(docs)].sum(0).A.ravel()
        np.testing.assert_allclose(both[7 + gi].toarray().ravel(), v / np.linalg.norm(v), atol=1e-6)


def test_softmax_candidate_loss_equals_a_per_document_loop():
    torch.manual_seed(0)
    head = build_head("mhc_multilabel", 6, 10, num_groups=3, hidden_dim=4, candidates_topk=2)
    x, target = torch.randn(4, 6), pad_labels([[0, 9], [4], [], [2, 3, 8]])
    out = head.candidates(x, target)
    got = head.loss_from_candidates(out, target, "softmax")
    assert torch.equal(head(x, target, candidate_loss="softmax").loss, got)
    group = torch.nn.functional.binary_cross_entropy_with_logits(
        out.group_logits, head._group_targets(target)
    )
    per_doc = []
    for b in range(4):
        real = [j for j in range(out.candidates.shape[1]) if out.candidate_mask[b, j]]
        logp = torch.log_softmax(out.candidate_logits[b, real], 0)
        pos = [i for i, j in enumerate(real) if int(out.candidates[b, j]) in target[b].tolist()]
        if pos:
            per_doc.append(-logp[pos].mean())
    torch.testing.assert_close(got, torch.stack(per_doc).mean() + group)
    with pytest.raises(ValueError, match="candidate_loss must be one of"):
        head.loss_from_candidates(out, target, "ce")


def test_lexical_softmax_deep_bigram_model_trains_and_reloads(wordnet_small, tmp_path):
    out = tmp_path / "lex"
    cfg = TrainConfig(
        data_dir=str(wordnet_small),
        output=str(out),
        epochs=10,
        batch_size=64,
        tfidf_dim=64,
        tfidf_layers=1,
        ngram_max=2,
        lexical=True,
        candidate_loss="softmax",
        num_groups=20,
        candidates_topk=4,
        threads=1,
        progress=False,
        seed=1,
    )
    summary = train(cfg)
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"]["lexical_nnz"] > 0 and meta["model"]["tfidf_layers"] == 1
    assert any(" " in w for w in json.loads((out / "tfidf.json").read_text())["vocabulary"])  # bigrams
    best = load_checkpoint(out / "model.pt")
    assert (
        "lexical.val" in best["state_dict"]
        and float(best["state_dict"]["lexical.weight"]) != cfg.lexical_weight
    )
    # the saved folder ranks exactly as the trainer's validation did (centroids travel in model.pt); without
    # its learned ranker (fitted after the epochs), which ranks as its own final fit did
    res = evaluate_model_dir(out, wordnet_small, "valid", ranker=False)
    assert evaluate_model_dir(out, wordnet_small, "valid") == summary["ranker"]["ranker_final"]
    row = summary["history"][summary["best_epoch"]]
    assert res["P@5"] == pytest.approx(row["P@5"], abs=1e-6)
    ds = load_dataset(wordnet_small)
    top = np.argsort(-np.asarray(ds.splits["train"].labels.sum(0)).ravel())[:5]
    pop = M.xmc_metrics(np.tile(top, (len(ds.splits["valid"]), 1)), ds.splits["valid"].labels)
    assert res["P@1"] > pop["P@1"] + 12, (res, pop)


def test_resume_after_kill_logs_each_epoch_once_and_best_matches(wordnet_small, tmp_path):
    kw = dict(head="flat", epochs=2, swa=False, batch_size=128, tfidf_dim=32, threads=1, progress=False)
    kw["ranker"] = False  # epoch rows only (the ranker's row: test_xmc_issue28.py)
    part = tmp_path / "part"
    train(TrainConfig(data_dir=str(wordnet_small), output=str(part), max_steps=19, **kw))
    with open(part / "log.jsonl", "a") as fh:  # a row of epoch 1 logged just before a kill
        fh.write(json.dumps({"epoch": 1, "split": "valid", "P@5": 0.0}) + "\n")
    resumed = train(TrainConfig(data_dir=str(wordnet_small), output=str(part), resume=True, **kw))
    log = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["P@5"] > 0
    ck, best = load_checkpoint(part / "checkpoint.pt"), load_checkpoint(part / "model.pt")
    assert best["epoch"] == ck["best_epoch"] == resumed["best_epoch"]


def _dictd(tmp_path, entries):
    body, index, off = b"", [], 0
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def enc(n):
        s = ""
        while True:
            s = b64[n % 64] + s
            n //= 64
            if not n:
                return s

    for head, text in [("00-database-short", "x")] + entries:
        chunk = f"{head}\n\n   {text}\n".encode()
        index.append(f"{head}\t{enc(off)}\t{enc(len(chunk))}")
        body += chunk
        off += len(chunk)
    (tmp_path / "foldoc.index").write_text("\n".join(index) + "\n")
    (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(body))
    assert base64  # dictd numbers are base-64 digits, not the base64 codec


def test_foldoc_builder_labels_are_linked_headwords_removed_from_text(tmp_path):
    entries = [
        ("Perl", "A {scripting language} by {Larry Wall (http://wall.org)}, cf. {Unix}."),
        ("Unix", "An {operating system} much like {Multics}."),
        ("scripting language", "A language for glue, e.g. {Perl} on {Unix}."),
        ("operating system", "Software that runs {Unix} and {Perl} programs."),
        ("Multics", "An old {operating system}."),
    ]
    _dictd(tmp_path, entries)
    splits, stats = build_foldoc_xmc(tmp_path, min_docs=2, seed=0)
    rows = {t.split(":")[0]: (t, labs) for s in splits.values() for t, labs in s}
    # 'larry wall' is no headword; 'scripting language' and 'multics' are linked by one document only
    assert rows["Perl"] == ("Perl: A by , cf. .", ["unix"])
    assert rows["Unix"][1] == ["operating_system"]
    assert rows["operating system"][1] == ["perl", "unix"]
    assert rows["Multics"][1] == ["operating_system"]
    assert stats["documents"] == 5 and stats["labels"] == 3
    again, _ = build_foldoc_xmc(tmp_path, min_docs=2, seed=0)
    assert again == splits


def test_foldoc_cli_writes_a_raw_dataset_the_reader_loads(tmp_path):
    from xmc.data import load_dataset
    from xmc.datasets import main

    _dictd(tmp_path, [("A", "see {B} and {C}"), ("B", "see {C}"), ("C", "see {B}"), ("D", "see {B} {C}")])
    main(["foldoc", "--dict-dir", str(tmp_path), "--out", str(tmp_path / "ds"), "--compress", "xz"])
    ds = load_dataset(tmp_path / "ds")
    assert ds.label_vocab == ["b", "c"]
    assert sum(len(p) for p in ds.splits.values()) == 4
    assert json.loads((tmp_path / "ds" / "stats.json").read_text())["labels"] == 2


def test_cli_flags_map_to_the_config_the_trainer_tests_use():
    from xmc.cli import build_parser, config_from_args

    argv = "train --data-dir D --output O --candidate-loss softmax --tfidf-layers 1 --ngram-max 2"
    cfg = config_from_args(build_parser().parse_args(argv.split()))
    assert (cfg.candidate_loss, cfg.tfidf_layers, cfg.ngram_max, cfg.use_lexical()) == ("softmax", 1, 2, True)
    cfg = config_from_args(
        build_parser().parse_args(
            "train --data-dir D --output O --no-lexical --dense-grad --dist-timeout 60".split()
        )
    )
    assert (cfg.lexical, cfg.sparse_grad, cfg.dist_timeout, cfg.epochs) == (False, False, 60.0, 10)


def test_neighbour_votes_match_brute_force_and_combine_with_mhc():
    from xmc.model import NeighbourScorer

    rng = np.random.default_rng(0)
    x_tr = sp.random(40, 50, density=0.15, format="csr", dtype=np.float32, random_state=2)
    x_tr = sp.csr_matrix(x_tr.multiply(1 / np.maximum(np.sqrt(x_tr.multiply(x_tr).sum(1)), 1e-9)))
    y_tr = sp.csr_matrix((rng.random((40, 7)) < 0.3).astype(np.float32))
    x_q = sp.random(9, 50, density=0.15, format="csr", dtype=np.float32, random_state=3)
    k = 5
    scorer = NeighbourScorer(50, 40, 7, x_tr.nnz, y_tr.nnz, k=k, power=2.0, weight=0.7)
    scorer.set_data(x_tr, y_tr)
    got = scorer(**csr_to_bag(x_q)).numpy()
    sims = x_q.toarray() @ x_tr.toarray().T
    want = np.zeros((9, 7))
    for i in range(9):
        near = [j for j in np.argsort(-sims[i], kind="stable")[:k] if sims[i, j] > 0]
        w = sims[i, near] ** 2
        if w.sum() > 0:
            want[i] = 0.7 * (w / w.sum()) @ y_tr[near].toarray()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    again = scorer(**csr_to_bag(x_q)).numpy()  # cached: same batch, same votes
    np.testing.assert_array_equal(got, again)

    # MHC + neighbours: score = candidate score (0 off the candidates) + votes, ranked over all N labels
    torch.manual_seed(0)
    model = XMCModel({**_cfg(), "neighbours": k, "neighbour_nnz": {"docs": 40, "docs_nnz": x_tr.nnz,
                                                                    "labels_nnz": y_tr.nnz}}, 7, 50)  # fmt: skip
    model.neighbours.set_data(x_tr, y_tr)
    model.neighbours.weight.fill_(0.7)
    model.eval()
    inputs = csr_to_bag(x_q)
    scores, ids = model.topk(inputs, k=7)
    with torch.no_grad():
        out = model.head.candidates(model.features(inputs))
    cand = torch.zeros(9, 7)
    gid = model.head.candidate_global_ids(out)
    s = torch.sigmoid(out.candidate_logits) * out.group_scores
    for i in range(9):
        for j in range(gid.shape[1]):
            if gid[i, j] >= 0 and out.candidate_mask[i, j]:
                cand[i, gid[i, j]] = s[i, j]
    total = (cand + torch.from_numpy(want).float()) / 1.7  # normalised by 1 + weight: scores in [0, 1]
    np.testing.assert_allclose(scores, total.gather(1, ids), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, total.sort(1, descending=True).values, rtol=1e-5, atol=1e-6)
    # weight 0 turns the votes off: plain MHC ranking
    model.neighbours.weight.fill_(0.0)
    np.testing.assert_array_equal(model.topk(inputs, 3)[1], model.head.topk(model.features(inputs), 3)[1])
