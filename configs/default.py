"""Default hyper-parameters: every field flaxcap reads lives here; variants override a few."""

import ml_collections

from flaxcap import vocab


def get_config():
  """Returns the default `ml_collections.ConfigDict`."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A run to start from (a workdir, checkpoint or exported model): a new run takes its decoder's
  # parameters, and its encoder's when it fine-tuned one (kept frozen or trained further); "" = from
  # scratch. Self-critical training needs one; a resumed run restores its own checkpoint instead.
  config.init_checkpoint = ""

  # Data: where the captions and images are, and how they are laid out.
  config.data = ml_collections.ConfigDict()
  config.data.layout = "flickr8k"  # flickr8k | kaggle | karpathy | coco | tfds (README "Data")
  config.data.root = "../shared/data/flickr8k"  # the dataset folder; relative paths below are under it
  config.data.images_dir = ""  # "" = the layout's default image folder (coco: "{split}2014")
  config.data.captions_file = ""  # "" = Flickr8k_text/Flickr8k.token.txt | captions.txt |
  #   annotations/captions_{split}2014.json ({split} = train | val | test for coco)
  config.data.split_file = ""  # flickr8k: folder of Flickr_8k.*Images.txt ("" = Flickr8k_text);
  #   kaggle: that folder or a Karpathy dataset_*.json, "" = split by a hash of the image id
  config.data.karpathy_json = ""  # karpathy layout: "" = root/dataset_flickr8k.json or the one dataset_*.json
  config.data.restval_to_train = True  # karpathy / coco_captions: fold "restval" into train
  config.data.hash_dev_fraction = 0.1  # kaggle without split file: dev share by id hash
  config.data.hash_test_fraction = 0.1  # kaggle without split file: test share by id hash
  config.data.tfds_name = "flickr8k"  # tfds layout: flickr8k (prepared from root) | coco_captions
  config.data.tfds_data_dir = ""  # tfds layout: TFDS data dir ("" = ~/tensorflow_datasets)
  config.data.train_split = "train"
  config.data.eval_split = "dev"
  config.data.captions_per_epoch = "one"  # one: a random caption per image each epoch; all: every caption
  #   (epochs are fully shuffled in numpy, see flaxcap/epoch_plan.py: no shuffle buffer)
  config.data.max_len = 22  # caption tokens incl. <bos>/<eos>
  config.data.augment = False  # random crop + colour jitter
  config.data.hflip = False  # horizontal flip swaps "left" and "right": off by default
  config.data.cache_features = True  # encode once, cache under workdir: a frozen encoder's features,
  #   or when fine-tuning stages s.. the output of stages 0..s-1 (False: fine-tuning reads images
  #   through tf.data every step; a frozen encoder always caches)

  config.vocab = ml_collections.ConfigDict()
  config.vocab.min_count = 5
  config.vocab.max_size = 0  # 0 = no limit

  config.image_size = 224

  # Encoder: a pretrained CNN returning a feature grid [batch, h, w, channels].
  config.encoder = ml_collections.ConfigDict()
  config.encoder.name = "efficientnet_lite0"  # efficientnet_lite{0,1,2} | vgg16 | resnet50 | resnet101
  config.encoder.weights = "imagenet"  # imagenet | none | path to a torchvision-format .pth
  config.encoder.feature_stage = -1  # -1: last conv stage (7x7 at 224 px); see README for others
  config.encoder.trainable_stages = ()  # () = frozen; e.g. (5, 6) fine-tunes those stages
  config.encoder.learning_rate = 1e-4  # for the trainable stages
  config.encoder.frozen_batch_norm = False  # True: the trainable stages normalize with their running
  #   statistics while training too, and keep them (weights, scales and offsets still train)
  config.encoder.sync_batch_norm = True  # their batch statistics are the global batch's on every
  #   device (N devices train as 1 does); False: each device's own share (no cross-device reduction)
  config.encoder.dtype = "float32"  # float32 | bfloat16

  # Decoder: attention LSTM of "Show, Attend and Tell".
  config.decoder = ml_collections.ConfigDict()
  config.decoder.embed_dim = 512
  config.decoder.hidden_dim = 512
  config.decoder.attention_dim = 512
  config.decoder.dropout_rate = 0.5
  config.decoder.gate = True  # sigmoid gate beta(h) on the context vector
  config.decoder.prev2out = True  # deep output: add the word embedding
  config.decoder.ctx2out = True  # deep output: add the context vector
  config.decoder.attention_activation = "tanh"  # tanh (the paper) | relu, inside the additive attention
  config.decoder.dtype = "float32"  # float32 | bfloat16 compute
  config.decoder.unroll = 1  # time steps per iteration of the teacher-forced scan (speed only)
  config.decoder.recompute_attention = "auto"  # auto | true | false: a train step recomputes the
  #   attention's activation in the backward pass instead of keeping it (speed and memory only;
  #   flaxcap/decoder.py); auto: on a GPU or TPU, not on the CPU
  config.decoder.feature_dtype = ""  # "" = the compute dtype | bfloat16: features kept in bf16
  #   (with float32 compute: rounds the features once, halves what each step's context product reads)
  config.decoder.pad_columns_to = 1  # pad the layers' kernels with zero columns to a multiple of
  #   this inside each product (same values; aligned GPU GEMMs: hidden_proj has 2,561 columns)
  config.decoder.fused_attention = False  # decoding: each step's attention in one Pallas kernel
  #   (flaxcap/attention_kernel.py; a GPU kernel, interpreted elsewhere)
  config.decoder.score_kernel = False  # decoding: each step's attention scores in a Pallas kernel,
  #   softmax and context XLA's (flaxcap/attention_kernel.py; takes precedence over fused_attention)
  config.decoder.approx_tanh = False  # those kernels' tanh by the GPU's tanh.approx.f32 (scores
  #   rounded at 2^-11; exact tanh off the GPU)
  config.decoder.late_projected_grad = False  # training: the projected features' gradient in one
  #   pass after the backward scan, not summed in every step (flaxcap/late_grads.py; speed only)
  config.decoder.late_weight_grad = False  # training: the same for the kernels of hidden_proj and
  #   context_gates, one GEMM each over all steps (flaxcap/late_grads.py; speed only)
  config.decoder.score_vjp = False  # training with recompute_attention: the scores' backward pass
  #   written out, the activation recomputed into each sum, never stored (attention_grad.py); with
  #   score_kernel, the scores and their gradients by Pallas kernels (attention_grad_kernel.py)

  config.loss = ml_collections.ConfigDict()
  config.loss.alpha_c = 1.0  # doubly stochastic attention weight
  config.loss.label_smoothing = 0.0

  # Self-critical training (flaxcap/self_critical.py): fine-tunes a cross-entropy run on CIDEr-D.
  config.self_critical = ml_collections.ConfigDict()
  config.self_critical.num_samples = 0  # 0: cross-entropy training; K >= 2: K samples per image
  #   (starts from config.init_checkpoint)
  # Score the end of a caption too (CIDEr-D with an end token on both sides); without it the samples
  # learn to stop mid-phrase ("a boy is playing in a").
  config.self_critical.reward_end = True
  # The reward is CIDEr-D + bleu_weight * sentence BLEU-4 (sentence_scores.SentenceBleu); 0: CIDEr-D.
  config.self_critical.bleu_weight = 0.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # adam | adamw
  config.optimizer.learning_rate = 4e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 5.0
  config.optimizer.schedule = "cosine"  # cosine | constant | plateau
  config.optimizer.warmup_steps = 500
  config.optimizer.plateau_factor = 0.5
  config.optimizer.plateau_patience = 2

  config.batch_size = 64  # global, split over devices
  config.num_epochs = 20
  config.half_precision = False

  config.eval = ml_collections.ConfigDict()
  config.eval.every_epochs = 1
  config.eval.max_images = 0  # 0 = the whole eval split
  config.eval.beam_size = 1  # greedy during training
  config.eval.max_len = 20
  config.eval.length_penalty = 0.0
  # Inference (Captioner, infer.py): no caption ends on a word that ends fewer than this fraction of
  # its training occurrences ("... playing in a red"); 0 = off. Training's own evaluation ignores it.
  config.eval.min_ending_rate = vocab.DEFAULT_MIN_ENDING_RATE
  config.eval.batch_size = 128
  config.eval.best_metric = "CIDEr"
  config.eval.patience = 5  # epochs without improvement before stopping (0 = never)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 2

  config.log_every_steps = 50
  config.distributed = False  # call jax.distributed.initialize() (multi-host)
  return config
