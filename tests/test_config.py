"""Config validation of the mesh (four in-slice axes, multi-slice dcn sizes), sequence and tensor divisibility,
the distributed settings, the attention choice and the learning-rate schedule: each bad value is named in one
message, by the key the user set rather than one derived from it."""
import pytest

from omni import config as config_lib
from omni.config import ConfigError, base_config
from omni.stages.registry import validate


def config(**mesh):
    c = base_config()
    c.mesh.update(mesh)
    return c


def test_minus_one_fills_the_devices_left_by_the_other_axes():
    m = validate(config(data=2, tensor=2, sequence=-1), 8).mesh
    assert (m.data, m.fsdp, m.tensor, m.sequence) == (2, 1, 2, 2)
    m = validate(config(data=-1, dcn_data=2), 8).mesh  # 2 slices of 4
    assert (m.data, m.dcn_data) == (4, 2)


@pytest.mark.parametrize("mesh,key", [
    (dict(data=3), "config.mesh"),
    (dict(dcn_data=-1), "config.mesh.dcn_data=-1"),
    (dict(data=-1, fsdp=-1), "config.mesh"),
    (dict(data=1, sequence=3), "config.mesh"),
])
def test_bad_meshes_are_named(mesh, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(config(**mesh), 8)


def test_sequence_and_tensor_must_divide_length_and_heads():
    c = config(data=1, sequence=8)
    c.train.seq_len = 100
    with pytest.raises(ConfigError, match=r"config\.train\.seq_len=100"):
        validate(c, 8)
    c = config(data=1, tensor=8)
    c.model.num_heads = 4
    with pytest.raises(ConfigError, match=r"config\.model\.num_heads=4"):
        validate(c, 8)
    c = config(data=1, tensor=4)
    c.model.vocab_size = 50257  # GPT-2's vocabulary cannot be split in 4 whole shards (configs/gpt3_175b.py pads)
    with pytest.raises(ConfigError, match=r"config\.model\.vocab_size=50257"):
        validate(c, 4)
    c = config(data=1, fsdp=8)
    c.model.d_model = 100
    with pytest.raises(ConfigError, match=r"config\.model\.d_model=100.*fsdp"):
        validate(c, 8)


def test_a_filled_mesh_axis_is_named_as_the_minus_one_the_user_set():
    c = config(data=1, sequence=-1)
    c.train.seq_len = 100
    with pytest.raises(ConfigError, match=r"config\.train\.seq_len=100: .*mesh\.sequence=-1 filled to 8"):
        validate(c, 8)


def test_a_run_shorter_than_its_warmup_names_train_steps_when_the_decay_follows_it():
    c = base_config()
    c.train.steps, c.optim.warmup_steps = 2, 10
    with pytest.raises(ConfigError, match=r"^config\.train\.steps=2: must exceed optim\.warmup_steps=10 "
                                          r"\(the cosine decay runs over train\.steps\)$"):
        validate(c, 1)
    c.optim.decay_steps = 5  # set by the user: the key to name
    with pytest.raises(ConfigError, match=r"^config\.optim\.decay_steps=5: must exceed optim\.warmup_steps=10$"):
        validate(c, 1)
    c.optim.decay_steps = 20  # an explicit decay may outlast a short run
    assert validate(c, 1).optim.decay_steps == 20
    c.optim.decay_steps = -1
    c.train.steps = 11
    assert validate(c, 1).optim.decay_steps == 11


def test_batch_must_divide_over_slices_too():
    c = config(data=2, dcn_data=2)
    c.train.batch_size = 6
    with pytest.raises(ConfigError, match=r"dcn_data"):
        validate(c, 4)


def test_distributed_and_attention_values():
    c = base_config()
    c.distributed.update(num_processes=2, process_id=2)
    with pytest.raises(ConfigError, match=r"config\.distributed\.process_id=2"):
        validate(c, 1)
    c = base_config()
    c.model.attention = "flash"
    with pytest.raises(ConfigError, match=r"config\.model\.attention='flash'"):
        validate(c, 1)


def test_a_kernel_without_dropout_is_refused_when_dropout_is_on():
    c = base_config()
    c.model.update(attention="splash", dropout=0.1)
    with pytest.raises(ConfigError, match=r"config\.model\.attention='splash'"):
        validate(c, 1)
    c.model.attention = "auto"  # auto falls back to the XLA path instead
    validate(c, 1)


def test_a_workdir_config_from_an_older_run_gets_the_new_keys_defaults():
    saved = base_config().to_dict()
    saved["model"]["num_layers"] = 3
    saved["extra_from_the_run"] = "kept"
    del saved["data"]["labeler_noise"], saved["ppo"]
    config = config_lib.with_defaults(saved)
    assert config.data.labeler_noise == base_config().data.labeler_noise
    assert config.ppo.to_dict() == base_config().ppo.to_dict()
    assert config.model.num_layers == 3 and config.extra_from_the_run == "kept"


def test_gold_reward_needs_the_instruction_suite():
    c = base_config()
    c.stage, c.data.name, c.ppo.gold_reward = "ppo", "text", True
    c.model.dropout = 0.0
    with pytest.raises(ConfigError, match="ppo.gold_reward"):
        validate(c, 1)


def test_int8_models_are_for_inference_only():
    c = base_config()
    c.model.quant = "int4"
    with pytest.raises(ConfigError, match="config.model.quant='int4'"):
        validate(c, 1)
    c.model.quant = "int8"
    with pytest.raises(ConfigError, match="stage 'pretrain' trains float"):
        validate(c, 1)
    c.stage = "sample"
    validate(c, 1)
    source, sft = base_config(), base_config()
    source.model.quant, source.init_from = "int8", "runs/tiny"
    sft.stage, sft.init_from = "sft", "runs/tiny_int8"
    with pytest.raises(ConfigError, match=r"runs/tiny_int8 holds an INT8 model.*from \(runs/tiny\)"):
        config_lib.inherit_architecture(sft, source)


def test_eval_batches_must_be_positive_and_named():
    c = base_config()
    c.train.eval_batches = 0
    with pytest.raises(ConfigError, match=r"config.train.eval_batches=0: must be a positive int"):
        validate(c, 1)
