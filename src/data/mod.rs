//! Turning user data into model inputs: images, tokenizer, chat templates, the processor.

pub mod chat_template;
pub mod image;
pub mod processor;
pub mod resample;
pub mod tokenizer;
