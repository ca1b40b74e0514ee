from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kgrank.ranking.table import TokenIndex, item_tokens_text


def test_attribute_values_join_the_query_tokens() -> None:
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "colour": ["red", None, "blue"],
                          "material": ["linen", "wool", 3]})
    texts = item_tokens_text(["Soft Shirt", "Warm Scarf", "Mug"], items, ["colour", "material"])
    assert texts == ["Soft Shirt red linen", "Warm Scarf wool", "Mug blue"]
    assert item_tokens_text(["x", "y", "z"], items, []) == ["x", "y", "z"]
    with pytest.raises(ValueError, match="2 item texts for 3 items"):
        item_tokens_text(["x", "y"], items, ["colour"])
    index = TokenIndex.build(texts)
    share = index.overlap(np.array(["red linen shirt", None, "blue striped"], dtype=object))
    np.testing.assert_allclose(share.toarray(), [[1, 0, 0], [0, 0, 0], [0, 0, 0.5]], rtol=1e-6)
