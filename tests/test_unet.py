import math

import pytest
import torch

from p2core.errors import UserError
from p2core.unet import (AttentionBlock, convert_official_state_dict, create_model, load_weights,
                         timestep_embedding, to_official_state_dict)


def test_parameter_count_of_official_adm_256_uncond():
    # openai/guided-diffusion 256x256_diffusion_uncond.pt holds 552,814,086 parameters
    with torch.device("meta"):
        m = create_model(256, 256, 2, learn_sigma=True, attention_resolutions="32,16,8", num_head_channels=64,
                         resblock_updown=True, use_scale_shift_norm=True)
    assert sum(p.numel() for p in m.parameters()) == 552_814_086


def test_orientation_config_is_8m_parameters():
    m = create_model(32, 64, 2, channel_mult="1,2,2", learn_sigma=True, attention_resolutions="16,8",
                     num_head_channels=32, resblock_updown=True)
    assert sum(p.numel() for p in m.parameters()) == 7_994_182


@pytest.mark.parametrize("in_ch,learn_sigma", [(1, False), (3, True)])
def test_shapes_and_learn_sigma_doubles_outputs(in_ch, learn_sigma):
    m = create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8", in_channels=in_ch,
                     learn_sigma=learn_sigma, dropout=0.1)
    out = m(torch.randn(2, in_ch, 16, 16), torch.tensor([3, 700]))
    assert out.shape == (2, in_ch * (2 if learn_sigma else 1), 16, 16)


def test_official_keywords_accepted_and_unknown_rejected():
    m = create_model(16, 32, 1, channel_mult="1,2", class_cond=True, num_heads_upsample=-1, use_checkpoint=False,
                     use_fp16=False, use_new_attention_order=True)
    assert m.label_emb.num_embeddings == 1000
    with pytest.raises(TypeError, match="bogus"):
        create_model(16, 32, 1, channel_mult="1,2", bogus=1)


def test_timestep_embedding_closed_form():
    e = timestep_embedding(torch.tensor([0.0, 10.0]), 6)
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    want = [math.cos(10 * f) for f in freqs] + [math.sin(10 * f) for f in freqs]
    assert torch.allclose(e[1], torch.tensor(want), atol=1e-6)
    assert torch.allclose(e[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))


def official_attention(qkv, n_heads, new_order):
    """The official QKVAttentionLegacy / QKVAttention maths, written out: qkv [B, 3*H*C, T] -> [B, H*C, T]."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q, k, v = (z.reshape(bs * n_heads, ch, length) for z in (q, k, v))
    else:
        q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads,head_ch", [(1, -1), (4, -1), (1, 16)])
def test_attention_matches_official_qkv_layout(new_order, heads, head_ch):
    torch.manual_seed(0)
    blk = AttentionBlock(64, num_heads=heads, num_head_channels=head_ch, use_new_attention_order=new_order)
    torch.nn.init.normal_(blk.proj_out.weight)
    x = torch.randn(2, 64, 4, 4)
    qkv = blk.qkv(blk.norm(x).reshape(2, 64, 16))
    ref = x + blk.proj_out(official_attention(qkv, blk.num_heads, new_order)).reshape(2, 64, 4, 4)
    assert torch.allclose(blk(x), ref, rtol=1e-4, atol=1e-5)


def official_names_tiny():
    """The official state_dict names for image_size 16, num_channels 32, channel_mult 1,2, num_res_blocks 1,
    attention at 8, resblock_updown, scale-shift norm, learn_sigma, in_channels 3 (hand-written)."""
    C, E = 32, 128
    sd = {"time_embed.0.weight": (E, C), "time_embed.0.bias": (E,), "time_embed.2.weight": (E, E),
          "time_embed.2.bias": (E,), "input_blocks.0.0.weight": (C, 3, 3, 3), "input_blocks.0.0.bias": (C,)}

    def res(prefix, cin, cout):
        d = {f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
             f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
             f"{prefix}.emb_layers.1.weight": (2 * cout, E), f"{prefix}.emb_layers.1.bias": (2 * cout,),
             f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
             f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,)}
        if cin != cout:
            d.update({f"{prefix}.skip_connection.weight": (cout, cin, 1, 1), f"{prefix}.skip_connection.bias": (cout,)})
        return d

    def attn(prefix, c):
        return {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,), f"{prefix}.qkv.weight": (3 * c, c, 1),
                f"{prefix}.qkv.bias": (3 * c,), f"{prefix}.proj_out.weight": (c, c, 1), f"{prefix}.proj_out.bias": (c,)}

    sd.update(res("input_blocks.1.0", 32, 32))
    sd.update(res("input_blocks.2.0", 32, 32))  # resblock down
    sd.update(res("input_blocks.3.0", 32, 64))
    sd.update(attn("input_blocks.3.1", 64))
    sd.update(res("middle_block.0", 64, 64))
    sd.update(attn("middle_block.1", 64))
    sd.update(res("middle_block.2", 64, 64))
    sd.update(res("output_blocks.0.0", 128, 64))
    sd.update(attn("output_blocks.0.1", 64))
    sd.update(res("output_blocks.1.0", 96, 64))
    sd.update(attn("output_blocks.1.1", 64))
    sd.update(res("output_blocks.1.2", 64, 64))  # resblock up
    sd.update(res("output_blocks.2.0", 96, 32))
    sd.update(res("output_blocks.3.0", 64, 32))
    sd.update({"out.0.weight": (32,), "out.0.bias": (32,), "out.2.weight": (6, 32, 3, 3), "out.2.bias": (6,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in sd.items()}


def tiny_model():
    return create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8", learn_sigma=True,
                        resblock_updown=True, use_scale_shift_norm=True)


def test_hand_built_official_state_dict_loads_strictly_and_round_trips():
    sd = official_names_tiny()
    m = tiny_model()
    assert set(m.state_dict()) == set(sd)
    m.load_state_dict(convert_official_state_dict(sd), strict=True)
    back = to_official_state_dict(m.state_dict())
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_fp16_official_state_dict_is_upcast_and_loads_strictly():
    # official fp16 checkpoints (and DataParallel's `module.` prefix) come out as float32 with the same values
    sd = official_names_tiny()
    wrapped = {"module." + k: v.half() for k, v in sd.items()}
    conv = convert_official_state_dict(wrapped)
    assert set(conv) == set(sd)
    for k, v in conv.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, wrapped["module." + k].float()), k
    assert all(v.dtype == torch.float16 for v in wrapped.values())  # the input is left alone
    m = tiny_model()
    load_weights(m, wrapped, "ddp.pt")
    got = m.state_dict()
    assert set(got) == set(sd)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], conv[k]) for k in sd)


def test_shape_mismatch_names_the_tensor_and_both_shapes():
    sd = official_names_tiny()
    m = create_model(16, 32, 1, channel_mult="1,2", attention_resolutions="8", learn_sigma=False,
                     resblock_updown=True)
    with pytest.raises(UserError, match=r"'out.2.weight' has shape \(6, 32, 3, 3\) in the checkpoint, \(3, 32, 3, 3\)"):
        load_weights(m, sd, "official.pt")
    sd.pop("time_embed.0.bias")
    with pytest.raises(UserError, match="time_embed.0.bias"):
        load_weights(tiny_model(), sd, "official.pt")
