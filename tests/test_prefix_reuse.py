"""Prefix reuse for agents: every turn re-sends the whole history (no session), at token grain;
a shared system prompt computed once; eviction that keeps it; outputs as without the cache and as transformers."""
import random
import threading

import pytest

from lmwrap_engine import GenerationConfig, pipeline
from lmwrap_engine.engine.block_manager import BlockManager
from lmwrap_engine.engine.scheduler import Scheduler
from lmwrap_engine.engine.sequence import Sequence
from tiny_models import assert_all_blocks_free, load_reference, reference_greedy, tiny_config

BS = 16
NEW = 8
GREEDY = GenerationConfig(max_new_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    path = tiny_model_dir("llama")
    return path, load_reference(path)


def tokens(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(n)]


def run(pipe, ids):
    return [t for d in pipe.stream_generate(input_ids=ids, gen_config=GREEDY) for t in d.token_ids]


def counters(pipe):
    st = pipe.stats()
    return st["num_prompt_tokens_computed"], st["num_prefix_hit_tokens"]


def agent_turns(pipe, system, task, observations):
    """One agent without a session: each turn sends the whole history again. Yields (prompt, output, computed, hit)."""
    history = system + task
    for obs in [[]] + observations:
        prompt = history + obs
        before = counters(pipe)
        out = run(pipe, prompt)
        after = counters(pipe)
        yield prompt, out, after[0] - before[0], after[1] - before[1]
        history = prompt + out


def test_agent_turn_computes_only_its_new_tokens(model):
    path, ref = model
    system, task = tokens(40, 1), tokens(11, 2)
    observations = [tokens(n, 10 + n) for n in (7, 20, 3, 16)]
    results = {}
    for caching in (True, False):
        with pipeline(path, tiny_config(num_gpu_blocks=64, enable_prefix_caching=caching)) as pipe:
            results[caching] = list(agent_turns(pipe, system, task, observations))
            assert_all_blocks_free(pipe)
    for t, ((prompt, out, computed, hit), (_, out_off, computed_off, _)) in enumerate(zip(results[True],
                                                                                        results[False])):
        assert out == out_off == reference_greedy(ref, prompt, NEW)[len(prompt):], t
        assert computed_off == len(prompt)
        if t == 0:
            assert (computed, hit) == (len(prompt), 0)
        else:
            # the observation, plus the previous turn's last sampled token (it had no KV yet):
            # everything before, including the previous turn's partly filled last block, is reused
            new = len(observations[t - 1]) + 1
            assert (computed, hit) == (new, len(prompt) - new), t


def test_agents_sharing_a_system_prompt_compute_it_once(model):
    path, ref = model
    system = tokens(40, 3)  # 2.5 blocks: its last 8 tokens share a block with each agent's own task
    tasks = [[300 + i] + tokens(5, 20 + i) for i in range(8)]  # distinct first tokens
    prompts = [system + task for task in tasks]
    outs = [None] * len(prompts)
    with pipeline(path, tiny_config(num_gpu_blocks=64)) as pipe:
        go = threading.Barrier(len(prompts))

        def agent(i):
            go.wait()
            outs[i] = run(pipe, prompts[i])

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(prompts))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        computed, hit = counters(pipe)
        assert_all_blocks_free(pipe)
    # whichever order they were admitted in: the system prompt once, then each agent's own tokens
    assert computed == len(system) + sum(len(t) for t in tasks)
    assert hit == (len(prompts) - 1) * len(system)
    for prompt, out in zip(prompts, outs):
        assert out == reference_greedy(ref, prompt, NEW)[len(prompt):]


def test_eviction_keeps_the_shared_prefix_under_a_tiny_cache(model):
    path, ref = model
    system = tokens(2 * BS, 4)
    tasks = [[300 + i] + tokens(7, 30 + i) for i in range(4)]
    others = [tokens(80, 40 + i) for i in range(3)]  # each fills 6 of the 8 blocks: all but the system prompt
    with pipeline(path, tiny_config(num_gpu_blocks=8)) as pipe:
        outs = [run(pipe, system + task) for task in tasks[:3]]
        outs += [run(pipe, ids) for ids in others]
        before = counters(pipe)
        outs.append(run(pipe, system + tasks[3]))
        after = counters(pipe)
        assert_all_blocks_free(pipe)
    # the system prompt, freed before the single-use prompts, outlived them: it had 3 users
    assert (after[0] - before[0], after[1] - before[1]) == (len(tasks[3]), len(system))
    prompts = [system + task for task in tasks[:3]] + others + [system + tasks[3]]
    with pipeline(path, tiny_config(num_gpu_blocks=8, enable_prefix_caching=False)) as pipe:
        assert [run(pipe, p) for p in prompts] == outs
    for prompt, out in zip(prompts[-2:], outs[-2:]):
        assert out == reference_greedy(ref, prompt, NEW)[len(prompt):]


def test_partial_block_reuse_with_int8_kv_matches_the_cache_off(model):
    path, _ = model
    system, task = tokens(40, 5), tokens(9, 6)
    observations = [tokens(5, 50), tokens(13, 51)]
    results = {}
    for caching in (True, False):
        with pipeline(path, tiny_config(num_gpu_blocks=64, quant_policy=8, enable_prefix_caching=caching)) as pipe:
            results[caching] = [(p, o) for p, o, _, _ in agent_turns(pipe, system, task, observations)]
            # a copy of a running sequence's partial block: the same prompt again while nothing else runs
            prompt = results[caching][-1][0]
            results[caching].append((prompt, run(pipe, prompt)))
            assert_all_blocks_free(pipe)
    # int8 KV is not transformers' arithmetic, but reused KV is the same KV: identical outputs
    assert results[True] == results[False]


def test_returning_turn_is_admitted_while_others_decode():
    bm = BlockManager(64, BS, enable_prefix_caching=True)
    sched = Scheduler(bm, max_batch_size=8, max_num_batched_tokens=64)

    def seq_of(ids, i):
        s = Sequence(i, i)
        s.token_ids = list(ids)
        return s

    def step():
        batch = sched.schedule()
        for s, n in zip(batch.seqs, batch.num_new_tokens):
            s.num_computed_tokens += n
            bm.cache_full_blocks(s)
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)  # a sampled token
        return batch

    history = tokens(100, 7)
    agent = seq_of(history, 0)
    sched.add(agent)
    while agent.num_computed_tokens < agent.num_tokens - 1:
        step()
    sched.remove(agent)
    bm.free(agent)                       # the turn is over; its history stays cached
    decoders = [seq_of(tokens(20, 8 + i), 1 + i) for i in range(3)]
    for s in decoders:
        sched.add(s)
    step()                               # they prefill, then decode
    step()
    returning = seq_of(agent.token_ids + tokens(6, 9), 4)
    sched.add(returning)
    batch = step()
    # the next step already runs it: 7 new tokens (the sampled one and 6 more) next to 3 decode rows
    assert batch.seqs[:3] == decoders and batch.num_new_tokens == [1, 1, 1, 7]
    assert batch.seqs[3] is returning and returning.num_computed_tokens == len(agent.token_ids) + 6
    for s in decoders + [returning]:
        sched.remove(s)
        bm.free(s)
    assert bm.num_free_blocks == 64
