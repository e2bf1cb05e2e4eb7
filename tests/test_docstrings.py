"""Every docstring example in bert4x runs and prints what it says (doctest), on the test backend."""

import doctest
import importlib
import pkgutil
import re

import pytest

import bert4x

MODULES = sorted(m.name for m in pkgutil.walk_packages(bert4x.__path__, prefix="bert4x."))


class ShapeChecker(doctest.OutputChecker):
    """Docstrings show shapes as tuples; the tensorflow backend prints `TensorShape([2, 3])`."""

    @staticmethod
    def _tuple(match):
        dims = [d.strip() for d in match.group(1).split(",") if d.strip()]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def check_output(self, want, got, optionflags):
        got = re.sub(r"TensorShape\(\[([^\]]*)\]\)", self._tuple, got)
        return super().check_output(want, got, optionflags)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(checker=ShapeChecker(), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs = dict(vars(module), keras=importlib.import_module("keras"), np=importlib.import_module("numpy"))
    for test in finder.find(module, name, globs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"


def test_every_public_layer_has_a_runnable_example():
    import keras

    import bert4x.layers as layers

    public = [getattr(layers, n) for n in dir(layers) if not n.startswith("_")]
    classes = [c for c in public if isinstance(c, type) and issubclass(c, keras.layers.Layer)]
    assert classes, "bert4x.layers exports no layer"
    lacking = [c.__name__ for c in classes if ">>>" not in (c.__doc__ or "")]
    assert not lacking, f"public layers without a docstring example: {lacking}"
