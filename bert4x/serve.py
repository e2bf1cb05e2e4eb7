"""HTTP serving of an exported SavedModel or a `.keras` model: JSON in and out, concurrent requests batched.

Run it with `python -m bert4x.serve --model PATH --port N [--vocab vocab.txt]`. Standard library only
(`http.server.ThreadingHTTPServer`): each connection has its thread, and one batching thread runs the model on the
rows of every request that arrived within `--max-wait-ms` (up to `--max-batch` rows), padded to the longest (on jax,
where each new input shape compiles, to the next of a few bucketed shapes: powers of two, then multiples of 32).

Routes:

- `GET /health`: `{"status": "ok", "inputs": [...], "outputs": [...], "max_length": ..., "max_batch": ...}`.
- `POST /predict`: one of
  - `{"text": "..." | ["...", ...], "text_pair": optional, same shape}` (needs `--vocab`; BERT-family inputs);
  - `{"token_ids": [[...], ...], "segment_ids": optional [[...], ...]}`;
  - `{"inputs": {"<input name>": [[...], ...], ...}}` for any model (e.g. T5's `Encoder-Input-Token`).

  The answer is `{"outputs": [{"<output name>": value, ...}, ...], "lengths": [...]}`, one entry per row, with the
  padding the batch added removed again (sequence outputs have each row's own length).

Errors: malformed JSON or a bad field 400, unknown route 404, a body over `--max-body-bytes` 413, a row longer
than the model serves or more rows than `--max-batch` 422, each with `{"error": message}`.

Example:
>>> load_runner("missing.keras")
Traceback (most recent call last):
...
FileNotFoundError: --model 'missing.keras' does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

__all__ = ["ModelRunner", "load_runner", "Batcher", "make_server", "main"]

_TEXT_INPUTS = ("Input-Token", "Input-Segment")


class RequestError(ValueError):
    """A request the server refuses: its HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ==================================================================================================== the model
class ModelRunner:
    """A model as `fn(feeds: {input name: int32 array}) -> {output name: np.ndarray}` plus what the server checks.

    Args:
        call: the function running one padded batch.
        input_names: the model's input names, in order.
        output_names: the names of its outputs.
        max_length: the longest row it serves (None: unbounded).
        compiles_per_shape: each new input shape compiles anew (jax): the batcher pads to bucketed shapes.
        length_axes: for each output, the axes of one row's output that follow the input's length (a sequence
            output `[len, hidden]`: `(0,)`; a span output `[heads, len, len]`: `(1, 2)`), which the batcher cuts back
            to each row's length. An output not listed is cut on its leading axes that have the padded length.
    """

    def __init__(self, call: Callable[[dict], dict], input_names: list[str], output_names: list[str],
                 max_length: int | None, compiles_per_shape: bool = False,
                 length_axes: dict[str, tuple[int, ...]] | None = None):
        self.call, self.input_names, self.output_names, self.max_length = call, input_names, output_names, max_length
        self.compiles_per_shape, self.length_axes = compiles_per_shape, dict(length_axes or {})

    def __call__(self, feeds: dict) -> dict:
        return self.call(feeds)


def load_runner(path: str) -> ModelRunner:
    """Loads a SavedModel directory (from `bert4x.export.export_model`) or a `.keras` file as a `ModelRunner`.

    Args:
        path: the SavedModel directory or the `.keras` file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model {path!r} does not exist.")
    if os.path.isdir(path):
        from bert4x.export import load_saved_model_signature

        signature = load_saved_model_signature(path)
        # tensorflow's Python view renames 'Input-Token' to 'Input_Token'; the export's own record keeps the names
        # of the SignatureDef (what TF Serving and this server take).
        names = list(signature.input_specs)
        specs = signature.loaded.signatures["serving_default"].structured_outputs
        outputs = list(specs)
        info = os.path.join(path, "assets.extra", "bert4x.json")
        limit = None
        if os.path.isfile(info):
            with open(info) as f:
                record = json.load(f)
            limit, names = record.get("max_length"), record.get("inputs", names)
        axes = {name: _free_axes(spec.shape) for name, spec in specs.items()}
        return ModelRunner(lambda feeds: signature(**feeds), names, outputs, limit, length_axes=axes)
    if path.endswith(".keras"):
        import keras

        import bert4x.layers  # noqa: F401 (registers bert4x's layers for loading)
        import bert4x.models  # noqa: F401
        from bert4x.export import _output_names, max_length
        from bert4x.inference import CompiledInference

        model = keras.saving.load_model(path, compile=False)
        infer = CompiledInference(model)
        crfs = [f"{layer}-Viterbi" for layer in _crf_names(model)]
        outputs = _output_names(model) + crfs
        axes = dict(zip(outputs, [_free_axes(t.shape) for t in model.outputs] + [(0,)] * len(crfs)))
        return ModelRunner(infer, infer.input_names, outputs, max_length(model), infer.compiles_per_shape, axes)
    raise ValueError(f"--model {path!r} is neither a SavedModel directory nor a .keras file.")


def _free_axes(shape) -> tuple[int, ...]:
    """The axes of one row of an output of `shape` (`[batch, ...]`) that the model leaves free: its length axes."""
    dims = list(shape)[1:]
    return tuple(axis for axis, size in enumerate(dims) if size is None)


def _crf_names(model) -> list[str]:
    from bert4x.export import _crf_outputs

    return [layer.name for layer in _crf_outputs(model).values()]


# ==================================================================================================== batching
class _Pending:
    def __init__(self, rows: dict[str, list[list[int]]]):
        self.rows = rows
        self.count = len(next(iter(rows.values())))
        self.done = threading.Event()
        self.result: list[dict] | None = None
        self.error: Exception | None = None


class Batcher:
    """Runs a `ModelRunner` on the rows of concurrent requests together, in one thread.

    Args:
        runner: the model.
        max_batch: the most rows in one model call (a request has at most this many).
        max_wait_ms: how long the first request of a batch waits for others.
        pad_id: the id padding shorter rows.
    """

    def __init__(self, runner: ModelRunner, max_batch: int = 32, max_wait_ms: float = 5.0, pad_id: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        self.runner, self.max_batch, self.max_wait, self.pad_id = runner, max_batch, max_wait_ms / 1000, pad_id
        self.queue: queue.Queue[_Pending] = queue.Queue()
        self.batches_run = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bert4x-batcher", daemon=True)
        self._thread.start()

    def submit(self, rows: dict[str, list[list[int]]], timeout: float = 60.0) -> list[dict]:
        pending = _Pending(rows)
        self.queue.put(pending)
        if not pending.done.wait(timeout):
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"the model did not answer within {timeout} s.")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self):
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            group, rows = [first], first.count
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self.queue.get(timeout=left)
                except queue.Empty:
                    break
                if rows + nxt.count > self.max_batch:  # keep it for the next batch
                    self._run([nxt])
                    continue
                group.append(nxt)
                rows += nxt.count
            self._run(group)

    def _run(self, group: list[_Pending]):
        try:
            names = self.runner.input_names
            all_rows = {n: [r for p in group for r in p.rows[n]] for n in names}
            lengths = [len(r) for r in all_rows[names[0]]]
            longest, batch = max(lengths), len(lengths)
            if self.runner.compiles_per_shape:  # a few shapes, so that few compilations serve every batch
                longest, batch = _bucket(longest, self.runner.max_length), min(_bucket(batch), self.max_batch)
            feeds = {}
            for n in names:
                array = np.full((batch, longest), self.pad_id, dtype=np.int32)
                for i, r in enumerate(all_rows[n]):
                    array[i, :len(r)] = r
                feeds[n] = array
            outputs = self.runner(feeds)
            axes = self.runner.length_axes
            self.batches_run += 1
            start = 0
            for p in group:
                rows = []
                for i in range(start, start + p.count):
                    rows.append({k: _unpad(np.asarray(v)[i], longest, lengths[i], axes.get(k)).tolist()
                                 for k, v in outputs.items()})
                p.result, start = rows, start + p.count
        except Exception as e:  # the requests of this batch get the error; the server keeps serving
            for p in group:
                p.error = e
        for p in group:
            p.done.set()


def _bucket(size: int, limit: int | None = None) -> int:
    """`size` rounded up to the next power of two below 32, else to the next multiple of 32; at most `limit`."""
    rounded = 1 << (size - 1).bit_length() if size <= 32 else -(-size // 32) * 32
    return max(size, min(rounded, limit)) if limit else rounded


def _unpad(row: np.ndarray, longest: int, length: int, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """One row of an output without the batch's padding: its length `axes` (a sequence output `[len, ...]`: 0; a span
    output `[heads, len, len]`: 1 and 2) are cut to the row's own length. Without `axes`, the leading axes that have
    the padded length are."""
    if longest == length:
        return row
    index = tuple(slice(0, length) if size == longest and (axis in axes if axes is not None else axis < 3)
                  else slice(None) for axis, size in enumerate(row.shape))
    return row[index]


# ==================================================================================================== HTTP
class _Service:
    def __init__(self, runner: ModelRunner, batcher: Batcher, tokenizer, max_body_bytes: int):
        self.runner, self.batcher, self.tokenizer, self.max_body_bytes = runner, batcher, tokenizer, max_body_bytes

    def health(self) -> dict:
        return {"status": "ok", "inputs": self.runner.input_names, "outputs": self.runner.output_names,
                "max_length": self.runner.max_length, "max_batch": self.batcher.max_batch,
                "text": self.tokenizer is not None}

    def rows(self, body: dict) -> dict[str, list[list[int]]]:
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object.")
        kinds = [k for k in ("text", "token_ids", "inputs") if k in body]
        if len(kinds) != 1:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               "give exactly one of 'text', 'token_ids' or 'inputs' (got "
                               f"{kinds or sorted(body)}).")
        names = self.runner.input_names
        if kinds[0] == "inputs":
            given = body["inputs"]
            if not isinstance(given, dict) or sorted(given) != sorted(names):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"'inputs' must be an object with the keys {names}.")
            rows = {n: _id_rows(given[n], f"inputs[{n!r}]") for n in names}
        else:
            if names[0] != _TEXT_INPUTS[0] or any(n not in _TEXT_INPUTS for n in names):
                raise RequestError(HTTPStatus.BAD_REQUEST,
                                   f"this model takes {names}: send them under 'inputs'.")
            if kinds[0] == "text":
                rows = self._encode(body)
            else:
                token_ids = _id_rows(body["token_ids"], "token_ids")
                segment_ids = body.get("segment_ids")
                segment_ids = ([[0] * len(r) for r in token_ids] if segment_ids is None
                               else _id_rows(segment_ids, "segment_ids"))
                rows = {"Input-Token": token_ids, "Input-Segment": segment_ids}
            rows = {n: rows[n] for n in names}
        counts = {n: len(r) for n, r in rows.items()}
        if len(set(counts.values())) != 1:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"every input needs the same number of rows, got {counts}.")
        for i, parts in enumerate(zip(*rows.values())):
            if len({len(p) for p in parts}) != 1:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"row {i}: the inputs have different lengths.")
            if not parts[0]:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"row {i} is empty.")
            if self.runner.max_length is not None and len(parts[0]) > self.runner.max_length:
                raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY,
                                   f"row {i} has {len(parts[0])} tokens; the model serves at most "
                                   f"{self.runner.max_length}.")
        count = next(iter(counts.values()))
        if count == 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "no rows given.")
        if count > self.batcher.max_batch:
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY,
                               f"{count} rows in one request; at most {self.batcher.max_batch} (--max-batch).")
        return rows

    def _encode(self, body: dict) -> dict:
        if self.tokenizer is None:
            raise RequestError(HTTPStatus.BAD_REQUEST, "this server has no vocabulary (--vocab): send 'token_ids'.")
        texts, pairs = body["text"], body.get("text_pair")
        single = isinstance(texts, str)
        texts = [texts] if single else texts
        if pairs is not None:
            pairs = [pairs] if single else pairs
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'text' must be a string or a list of strings.")
        if pairs is not None and (not isinstance(pairs, list) or len(pairs) != len(texts)
                                  or not all(isinstance(t, str) for t in pairs)):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'text_pair' must match 'text' (a string or as many strings).")
        tokens, segments = [], []
        for i, text in enumerate(texts):
            ids, segs = self.tokenizer.encode(text, None if pairs is None else pairs[i])
            tokens.append(ids)
            segments.append(segs)
        return {"Input-Token": tokens, "Input-Segment": segments}

    def predict(self, body: dict) -> dict:
        rows = self.rows(body)
        outputs = self.batcher.submit(rows)
        return {"outputs": outputs, "lengths": [len(r) for r in next(iter(rows.values()))]}


def _id_rows(value, field: str) -> list[list[int]]:
    if not isinstance(value, list) or not value:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{field!r} must be a non-empty list of lists of ids.")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]  # one row
    for i, row in enumerate(value):
        if not isinstance(row, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in row):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{field!r} row {i} must be a list of integers.")
        if any(v < 0 or v >= 2**31 for v in row):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{field!r} row {i} holds ids outside [0, 2**31).")
    return value


def _handler(service: _Service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            pass  # quiet by default; errors are answered to the client

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str):
            self._send(status, {"error": message})

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.rstrip("/") == "/health":
                self._send(HTTPStatus.OK, service.health())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; try GET /health or POST /predict.")

        def do_POST(self):  # noqa: N802
            length = self.headers.get("Content-Length")
            try:
                length = int(length)
            except (TypeError, ValueError):
                self.close_connection = True
                return self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required.")
            if self.path.rstrip("/") != "/predict":
                self.close_connection = True
                return self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; try POST /predict.")
            if length > service.max_body_bytes:
                self.close_connection = True  # the body is not read
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"the body has {length} bytes; at most {service.max_body_bytes} (--max-body-bytes).")
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._error(HTTPStatus.BAD_REQUEST, f"malformed JSON: {e}.")
            try:
                self._send(HTTPStatus.OK, service.predict(body))
            except RequestError as e:
                self._error(e.status, str(e))
            except Exception as e:  # a model failure: the client learns what, the server goes on
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    return Handler


def make_server(model: str | ModelRunner, host: str = "127.0.0.1", port: int = 8000, vocab: str | None = None,
                do_lower_case: bool = True, max_batch: int = 32, max_wait_ms: float = 5.0,
                max_body_bytes: int = 1 << 20) -> ThreadingHTTPServer:
    """An HTTP server for `model` (not started: call `serve_forever()`; `shutdown()` and `server_close()` stop it,
    `server.batcher.close()` stops its batching thread).

    Args:
        model: a SavedModel directory, a `.keras` file or a `ModelRunner`.
        host: the address to bind.
        port: the port (0 picks a free one: see `server.server_address`).
        vocab: a BERT vocab file: requests may then send text.
        do_lower_case: the tokenizer's lower-casing (uncased vocabularies, Chinese BERT).
        max_batch: the most rows per model call and per request.
        max_wait_ms: how long a batch waits for more requests.
        max_body_bytes: the largest request body.
    """
    runner = model if isinstance(model, ModelRunner) else load_runner(model)
    tokenizer = None
    if vocab is not None:
        from bert4x.tokenizers import Tokenizer

        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"--vocab {vocab!r} is not a file.")
        tokenizer = Tokenizer(vocab, do_lower_case=do_lower_case)
    batcher = Batcher(runner, max_batch=max_batch, max_wait_ms=max_wait_ms)
    server = ThreadingHTTPServer((host, port), _handler(_Service(runner, batcher, tokenizer, max_body_bytes)))
    server.daemon_threads = True
    server.batcher = batcher
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bert4x.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an exported SavedModel directory or a .keras file")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--vocab", help="vocab.txt of the model: lets requests send 'text'")
    parser.add_argument("--cased", action="store_true", help="do not lower-case text (cased vocabularies)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    server = make_server(args.model, args.host, args.port, args.vocab, not args.cased, args.max_batch,
                         args.max_wait_ms, args.max_body_bytes)
    host, port = server.server_address[:2]
    print(f"bert4x.serve: {args.model} on http://{host}:{port} (GET /health, POST /predict)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.batcher.close()


if __name__ == "__main__":
    main()
