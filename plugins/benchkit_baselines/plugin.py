"""Registers the baseline defenses (no defense and the generative purifiers of DiffPure's Table 5a),
the classifiers, and the kind "generative-models" that the purifiers look their networks up in."""
from __future__ import annotations

from benchkit.defended import Identity
from benchkit.hookspecs import hookimpl

from benchkit_baselines.gan import GANInversionParams, make_gan_inversion
from benchkit_baselines.vae import VAEParams, make_vae
from benchkit_baselines.weights import generative_assets


@hookimpl
def register_component_kinds(register):
    from benchkit_baselines import hookspecs

    register("generative-models", hookspecs=hookspecs, hook="register_generative_models",
             description="VAEs, GAN generators and encoders of the generative purifiers")


def gan_inversion_modes(params: GANInversionParams) -> tuple[str, ...]:
    """Only the encoder is differentiable; the optimising modes output an argmin computed detached
    from the input, so they offer bpda and none alone."""
    return ("exact",) if params.mode == "enc" else ()


@hookimpl
def register_defenses(register):
    # gradient_modes: what each purifier differentiates beyond bpda / none, so `benchkit validate`
    # checks every cell's gradient mode before any model is built.
    register("identity", lambda params: Identity(), gradient_modes=("exact", "adjoint"),
             description="No defense: the undefended ('static') classifier of the paper's tables")
    register("vae", make_vae, params=VAEParams, gradient_modes=("exact",), assets=generative_assets("digits-vae"),
             description="VAE purification decode(encode(x)) with the digits VAE (generative model digits-vae)")
    register("gan-inversion", make_gan_inversion, params=GANInversionParams, gradient_modes=gan_inversion_modes,
             assets=generative_assets("digits-gan", "digits-gan-encoder"),
             description="GAN-inversion purification G(z*), z* by encoder, optimisation or both "
                         "(generative models digits-gan + digits-gan-encoder)")


@hookimpl
def register_classifiers(register):
    from benchkit_baselines.cifar_resnet import pyautoattack_resnet18

    register("cifar10-resnet18", lambda params: pyautoattack_resnet18(),
             description="CIFAR-10 ResNet-18 shipped inside pyautoattack (standard training, 93.7% on the first "
                         "1,000 test images): a real CIFAR-10 classifier on any machine")
    from benchkit_baselines.robustbench import RobustBenchParams, robustbench_assets, robustbench_classifier

    register("robustbench", robustbench_classifier, params=RobustBenchParams, assets=robustbench_assets,
             description="Any RobustBench model zoo entry by name / dataset / threat model, loaded offline "
                         "with robustbench's load_model (extra: pip install -e '.[robustbench]')")

    from benchkit_baselines.diffpure_cifar import DiffPureCifarParams, diffpure_cifar_assets, diffpure_cifar_classifier

    register("diffpure-cifar10", diffpure_cifar_classifier, params=DiffPureCifarParams, assets=diffpure_cifar_assets,
             description="DiffPure's own standard-trained CIFAR-10 classifiers (Tables 1, 2, 4): WRN-70-16 with "
                         "dropout 0.3 or ResNet-50, CIFAR mean/std inside, from BENCHKIT_HOME/diffpure/cifar10")

    from benchkit_baselines import attribute_net, imagenet_models as im

    register("imagenet-torchvision", im.torchvision_classifier, params=im.TorchvisionParams, assets=im.torchvision_assets,
             description="torchvision ResNet-50 / WRN-50-2 with the IMAGENET1K_V1 weights from BENCHKIT_HOME/imagenet "
                         "(DiffPure Table 3); normalises inside (extra: pip install -e '.[robustbench]')")
    register("deit-s", im.deit_s_classifier, params=im.DeiTParams, assets=im.deit_assets,
             description="DeiT-S (timm deit_small_patch16_224) with the DeiT release weights from BENCHKIT_HOME/imagenet "
                         "(DiffPure Table 3); normalises inside (extra: pip install -e '.[robustbench]')")
    register("celebahq-attribute", attribute_net.attribute_classifier, params=attribute_net.AttributeParams,
             assets=attribute_net.attribute_assets,
             description="gan-ensembling's CelebA-HQ attribute classifier for one attribute (DiffPure Tables 5a / 12): "
                         "256x256 [0,1] images -> 2 logits (1 = attribute present)")
