//! Turning user data into model inputs: images, tokenizer, chat templates, the processor.

pub mod chat_template;
pub mod chat_template_files;
pub mod chat_template_value;
pub mod image;
pub mod image_decode;
pub(crate) mod image_kernels;
pub mod image_processor;
pub mod image_processor_config;
pub mod processor;
pub mod python_text;
pub mod resample;
pub mod tokenizer;
pub mod tokenizer_batch;
pub mod tokenizer_config;
pub mod tokenizer_edit;
pub mod tokenizer_gguf;
