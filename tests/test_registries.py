"""The parameters that name a registered function allow exactly the registry's names.

dashflow/core/parameters.py lists the allowed names as literals, so that loading params.yaml
does not import torch (dashflow/core/algorithms.py does: +1.2 s on every command that reads
the parameters, measured on the 2-core CPU); this test ties each list to its registry, so a
function registered (or removed) without its parameter following fails here.
"""

import pytest

from dashflow.core import algorithms, parameters

REGISTRY_PARAMS = {
    "advantage.estimator": algorithms.ADVANTAGE_ESTIMATORS,
    "learn.loss_agg": algorithms.LOSS_AGGREGATIONS,
    "learn.kl_estimator": algorithms.KL_ESTIMATORS,
    "learn.objective": algorithms.POLICY_OBJECTIVES,
    "learn.tis_mode": algorithms.MISMATCH_CORRECTIONS,
}


@pytest.mark.parametrize("key", sorted(REGISTRY_PARAMS))
def test_a_registry_parameter_allows_exactly_the_registered_names(key):
    check, words = parameters.BY_KEY[key].allowed
    registered = set(REGISTRY_PARAMS[key])
    assert registered and all(check(name) for name in registered)
    assert set(words.removeprefix("one of ").split(", ")) == registered   # nothing allowed that is not registered
    assert not check("not-registered")
