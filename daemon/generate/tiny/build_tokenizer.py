"""Build the embedded tiny model's CLIP tokenizer (vocab.json, merges.txt) from English prompt text.

Not imported at runtime: run `python daemon/generate/tiny/build_tokenizer.py` by hand and commit its output.
The real CLIP vocabulary cannot be downloaded here, and the tiny model only needs a tokenizer with the same
*format* and behaviour: byte-level alphabet, `</w>` end-of-word markers, `<|startoftext|>` and `<|endoftext|>`
last. So a ~1000-token BPE is learned from the prompt-like text below (plain BPE with a deterministic
tie-break, so reruns write the same bytes), on words split by the exact normalizer and pre-tokenizer of
`transformers.CLIPTokenizer`. The vocabulary is laid out like OpenAI's CLIP vocabulary: 256 byte symbols,
the same 256 with `</w>`, one token per merge in merge order, then the two special tokens.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers

VOCAB_SIZE = 1000
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
OUT_DIR = Path(__file__).resolve().parent / "tokenizer"

CORPUS = """
A cat surfing a wave at sunset, cinematic lighting, slow motion.
A dog running through a field of flowers on a sunny afternoon.
Papers were floating in the air on a table in the library.
A red sports car driving along a winding coastal road, aerial view.
An astronaut walking on the surface of the moon, earth rising in the background.
Waves crashing against the rocks, foam and spray, golden hour.
A waterfall in a green forest, mist rising, birds flying overhead.
A city street at night with neon lights reflecting on wet pavement.
A young woman smiling and turning her head toward the camera.
An old man reading a newspaper on a park bench while pigeons walk around.
Clouds moving quickly across a blue sky over snowy mountains, time lapse.
A candle flame flickering in a dark room, shallow depth of field.
A horse galloping on the beach, sand flying, dramatic sky.
Fireworks exploding over a river, colorful sparks and smoke.
A panda eating bamboo in a quiet bamboo forest.
A boat sailing on a calm lake at dawn, gentle ripples on the water.
Rain falling on the leaves of a tropical plant, close up, macro shot.
A child blowing bubbles in the garden, the bubbles drifting in the wind.
A chef cooking noodles in a busy kitchen, steam rising from the pot.
A train moving through the countryside, fields and hills passing by.
Leaves falling from the trees in autumn, orange and yellow colors.
A jellyfish glowing in the deep ocean, particles floating around it.
A butterfly landing on a purple flower, wings slowly opening and closing.
A robot dancing in a futuristic city, high quality, detailed, 4k.
A painting of a starry night sky that comes to life, swirling stars.
Smoke rising from a cup of hot coffee on a wooden table by the window.
A girl with long hair walking through a wheat field in summer.
A lion resting under a tree in the savanna, the grass moving in the breeze.
A bird spreading its wings and flying away from a branch.
Snow falling on a small village with lights in the windows, winter evening.
A sailboat crossing the ocean during a storm, lightning in the distance.
Traffic on a highway at dusk, light trails, long exposure style.
A fish swimming in a clear stream over smooth stones.
A hot air balloon rising above the desert at sunrise.
Flowers blooming in spring, petals opening one by one.
A man playing guitar on a stage, the crowd clapping and cheering.
A fox looking around in a snowy forest, breath visible in the cold air.
A spaceship flying between planets, stars and nebula behind it.
A windmill turning slowly on a green hill under white clouds.
A couple dancing in a ballroom, elegant dresses, warm light.
Distorted, discontinuous, ugly, blurry, low resolution, motionless, static.
Disfigured, disconnected limbs, ugly faces, incomplete arms, bad anatomy.
Watermark, text, logo, jpeg artifacts, oversaturated, noisy, grainy, flicker.
Photorealistic, masterpiece, best quality, sharp focus, studio lighting.
A portrait of a woman with freckles, soft light, film grain, 35mm.
An eagle soaring over a canyon, wide shot, epic landscape.
A kitten playing with a ball of yarn on a carpet in the living room.
The camera slowly zooms in on a castle on top of a mountain.
The camera pans from left to right across a crowded market.
Water flowing down a river between large rocks in a valley.
A lighthouse on a cliff, waves below, seagulls circling above.
A volcano erupting at night, glowing lava flowing down its side.
A bee collecting pollen from a sunflower in a field.
Northern lights dancing over a frozen lake, stars shining.
A skateboarder doing a trick in an empty parking lot.
A dragon flying over a medieval town, smoke and fire.
A cup of tea being poured, slow motion, splash of water.
Children running and laughing on a playground after school.
A tiger walking through tall grass in the jungle, looking at the camera.
A glass of wine on a table at a restaurant, candles and soft music.
Sunlight shining through the trees in a misty morning forest.
A squirrel holding a nut and eating it on a tree branch.
An elephant spraying water with its trunk near a river.
A city skyline at sunset, the sun setting behind tall buildings.
Two friends talking and walking along a street in the rain with umbrellas.
A snowboarder riding down a steep slope, snow spraying behind.
A flag waving in the wind on a pole against a clear sky.
A vintage car parked in front of a diner, retro style, 1950s.
Ocean waves rolling onto a sandy beach with palm trees.
A dancer spinning on a stage, her dress flowing, spotlight.
A clock ticking on the wall, its hands moving, dust in the light.
Heavy rain on a window, city lights blurred behind the glass.
A penguin walking on ice and sliding into the water.
A field of tulips in the Netherlands, a windmill in the distance.
A monkey jumping from tree to tree in the rainforest.
The wind blowing through her hair as she looks at the sea.
A cowboy riding a horse across the desert, dust clouds, western.
A small boat floating on a river in a quiet village in Asia.
Steam from a train engine rising into the cold winter air.
An owl turning its head at night, its eyes shining in the moonlight.
""".strip().splitlines()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character map (the byte-level alphabet, in CLIP's order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def pretokenize(lines: list[str]) -> Counter[tuple[str, ...]]:
    """Words as CLIPTokenizer sees them (its normalizer, pre-tokenizer), split into byte symbols + `</w>`."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + END_OF_WORD)] += 1
    return words


def merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of `pair` in `word` by the merged symbol."""
    out: list[str] = []
    index = 0
    while index < len(word):
        if index + 1 < len(word) and (word[index], word[index + 1]) == pair:
            out.append(word[index] + word[index + 1])
            index += 2
        else:
            out.append(word[index])
            index += 1
    return tuple(out)


def train_merges(max_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair (ties: the smallest pair), so reruns agree."""
    words = pretokenize(CORPUS)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({merge_word(word, best): count for word, count in words.items()})
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: bytes, bytes + `</w>`, merge results in order, then the specials; VOCAB_SIZE in all."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet]
    seen = set(tokens)
    kept: list[tuple[str, str]] = []
    for left, right in merges:
        if len(tokens) + len(SPECIAL_TOKENS) >= VOCAB_SIZE:
            break
        kept.append((left, right))
        if left + right not in seen:
            tokens.append(left + right)
            seen.add(left + right)
    if len(tokens) + len(SPECIAL_TOKENS) != VOCAB_SIZE:
        raise SystemExit(f"corpus too small: only {len(tokens)} tokens before the special ones")
    tokens.extend(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}, kept


def main() -> None:
    """Write the four tokenizer files next to this script."""
    vocab, merges = build_vocab(train_merges(VOCAB_SIZE))
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (OUT_DIR / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1]}
    special |= {"pad_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[1]}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        **special,
    }
    (OUT_DIR / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (OUT_DIR / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT_DIR}")


if __name__ == "__main__":
    main()
