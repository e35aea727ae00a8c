"""Names spelled once in ccsr so that reading a run directory imports no model library, checked against the
library that defines them."""

from ccsr.rundir import LORA_WEIGHTS_NAME


def test_lora_weights_name_is_diffusers_own():
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    assert LORA_WEIGHTS_NAME == LORA_WEIGHT_NAME_SAFE
